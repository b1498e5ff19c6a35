"""Batch plans: which training images go into each batch of an epoch, in
which order and with which crops; i.i.d. (a random permutation) or
non-i.i.d. (every batch from exactly K classes, or the paper's pairs of
images of a class, distinct classes within each normalization group). The
host (`train_batches`, NumPy) and the device (`experiment.device_data`) make
their batches from the same plan, `batch_plan`."""

import numpy as np

from experiment import protocols
from experiment.preprocessing import crop
from experiment.preprocessing import crop_offsets
from experiment.preprocessing import normalize


def epoch_rng(seed, epoch):
    """The random generator of one epoch: the same for the same (seed, epoch),
    so shuffling and augmentation repeat, also after a resume."""
    return np.random.default_rng([seed, epoch])


def options(config):
    """A run's sampling: the keyword arguments of `batch_plan` after `rng`."""
    return {"batch_size": config["batch_size"],
            "classes_per_batch": config["classes_per_batch"],
            "pairs": protocols.pairs_group(config)}


def steps_per_epoch(labels, batch_size, classes_per_batch=None, pairs=None):
    """The number of batches of an epoch's plan (the same for every rng)."""
    if classes_per_batch is not None:
        return len(class_batches(labels, batch_size, classes_per_batch,
                                 epoch_rng(0, 0)))
    if pairs is not None:
        return len(pair_batches(labels, batch_size, pairs, epoch_rng(0, 0)))
    return -(-len(labels) // batch_size)


def batch_plan(labels, batch_size, rng, augmented=False,
               classes_per_batch=None, pairs=None):
    """Everything random in an epoch, drawn from `rng` in this order: for each
    batch, the indices of its examples and, if `augmented`, their
    `crop_offsets` (else None).

    i.i.d. (`classes_per_batch` and `pairs` None): the examples in a random
    order, cut into batches of `batch_size` (the last one smaller where the
    size does not divide). Non-i.i.d.: with `classes_per_batch` K, the
    batches of `class_batches`; with `pairs` G, those of `pair_batches`."""
    if classes_per_batch and pairs:
        raise ValueError("classes_per_batch and pairs exclude each other "
                         "(two samplings)")
    if classes_per_batch:
        batches = class_batches(labels, batch_size, classes_per_batch, rng)
    elif pairs:
        batches = pair_batches(labels, batch_size, pairs, rng)
    else:
        order = rng.permutation(len(labels))
        batches = (order[start:start + batch_size]
                   for start in range(0, len(order), batch_size))
    for index in batches:
        yield index, crop_offsets(len(index), rng) if augmented else None


def train_batches(images, labels, batch_size, mean, std, rng, augmented=False,
                  classes_per_batch=None, pairs=None, share=None):
    """One epoch of normalized batches `(x float32, y int32)` on the host, as
    `batch_plan` draws them. `share`: a function that keeps one process's
    part of each batch (hosts.Processes.share), applied after the whole plan
    is drawn: every process draws the same."""
    for index, offsets in batch_plan(labels, batch_size, rng, augmented,
                                     classes_per_batch, pairs):
        if share is not None:
            index = share(index)
            offsets = offsets and tuple(map(share, offsets))
        x = images[index]
        if offsets is not None:
            x = crop(x, *offsets)
        yield normalize(x, mean, std), labels[index]


# ------------------------------------------------------ K classes per batch


def _greedy_batches(groups, classes_per_batch, rng):
    """Which classes (positions in `groups`) give a group to each batch: the
    `classes_per_batch` classes with the most groups left, until fewer than
    that have any. Among tied classes, those not chosen yet come first (so
    every class is in some batch), then at random. Whichever tied classes
    are taken, the counts left are the same: so is the number of batches."""
    left = np.array(groups, dtype=np.int64)
    unused = np.ones(len(left), dtype=np.int64)
    chosen = []
    while np.count_nonzero(left) >= classes_per_batch:
        order = np.lexsort((rng.random(len(left)), -unused, -left))
        chosen.append(order[:classes_per_batch])
        left[chosen[-1]] -= 1
        unused[chosen[-1]] = 0
    return chosen


def class_batches(labels, batch_size, classes_per_batch, rng):
    """One epoch of batches of exactly `classes_per_batch` (K) classes: a list
    of index arrays into `labels`, every example in exactly one batch.

    Each class's examples are shuffled and cut into groups of
    m = batch_size / K (its last group smaller where m does not divide its
    count). Each batch takes the next group of each of the K classes with the
    most groups left (`_greedy_batches`), so, but for batches of the classes'
    last groups, it holds batch_size examples. Groups left when fewer than K
    classes have any each join a different random batch that holds their
    class (which grows beyond batch_size). The batches come in random order.

    Raises:
        ValueError: if K is not a positive integer that divides batch_size,
            or there are fewer than K classes in `labels`.
    """
    k, labels = classes_per_batch, np.asarray(labels)
    classes = np.unique(labels)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"classes_per_batch must be a positive integer, "
                         f"not {k!r}")
    if batch_size % k:
        raise ValueError(f"classes_per_batch {k} must divide batch_size "
                         f"{batch_size} (each class gives batch_size / "
                         f"classes_per_batch examples to a batch)")
    if k > len(classes):
        raise ValueError(f"classes_per_batch {k} is more than the "
                         f"{len(classes)} classes in the training data")
    per_group = batch_size // k
    counts, groups = [], []
    for label in classes:
        members = rng.permutation(np.flatnonzero(labels == label))
        starts = range(0, len(members), per_group)
        counts.append(len(starts))
        groups.append(iter([members[i:i + per_group] for i in starts]))
    batches, holders = [], [[] for _ in groups]
    for chosen in _greedy_batches(counts, k, rng):
        for position in chosen:
            holders[position].append(len(batches))
        batches.append([next(groups[position]) for position in chosen])
    extended = set()
    for position, rest in enumerate(groups):
        for group in rest:
            candidates = [b for b in holders[position] if b not in extended]
            target = int(rng.choice(candidates or holders[position]))
            extended.add(target)
            batches[target].append(group)
    return [np.concatenate(batches[i]) for i in rng.permutation(len(batches))]


# ------------------------------------------------ pairs in normalization groups


def _group_pairs(left, pairs_wanted, rng):
    """The classes (positions in `left`, the pairs each has left, which this
    decrements) of one normalization group's pairs, in order: rounds of one
    pair of every class that has any, most left first, ties at random, until
    the group has `pairs_wanted`. A round that finds a class without pairs
    ends an unfilled group there (it could only go on by doubling a class
    that another lacks), and with it the epoch."""
    taken = []
    while len(taken) < pairs_wanted:
        order = np.lexsort((rng.random(len(left)), -left))
        order = order[left[order] > 0][:pairs_wanted - len(taken)]
        left[order] -= 1
        taken.extend(order.tolist())
        if len(taken) < pairs_wanted and len(order) < len(left):
            break
    return taken


def _pair_plan(pair_counts, batch_size, group_size, rng):
    """Which class (a position in `pair_counts`) gives each pair of each
    batch: batches of batch_size / 2 pairs, cut from their start into groups
    of group_size / 2 pairs (the last smaller where group_size does not
    divide batch_size), filled by `_group_pairs` until one cannot be."""
    left = np.array(pair_counts, dtype=np.int64)
    group = min(group_size, batch_size)
    sizes = [min(group, batch_size - start) // 2
             for start in range(0, batch_size, group)]
    batches = []
    while left.any():
        batch = []
        for wanted in sizes:
            taken = _group_pairs(left, wanted, rng)
            batch.extend(taken)
            if len(taken) < wanted:  # no more full groups this epoch
                return batches + [batch]
        batches.append(batch)
    return batches


def pair_batches(labels, batch_size, group_size, rng):
    """One epoch of the paper's non-i.i.d. batches (Ioffe 2017, section 4): a
    list of index arrays into `labels`, each batch made of pairs of examples
    of one class (positions 2i and 2i + 1); within each normalization group
    of `group_size` (G) consecutive examples, counted from the batch's start
    as the layer's virtual batches are, G/2 pairs of distinct classes where
    G/2 is at most the number of classes with a pair, and beyond that every
    class, their numbers of pairs differing by at most one.

    Each class's examples are shuffled and cut into pairs (an odd one waits
    for another epoch; a class of one example has none). Groups are filled in
    order by `_group_pairs`, so the classes stay balanced over the epoch. The
    first group that cannot be filled so ends the epoch with its batch, a
    shorter one; the pairs left are not used this epoch. The number of
    batches depends only on the class counts.

    Raises:
        ValueError: if batch_size or group_size is not an even number >= 2.
    """
    for name, value in (("batch_size", batch_size),
                        ("group_size", group_size)):
        if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                or value < 2 or value % 2):
            raise ValueError(f"pairs need an even {name} >= 2, not "
                             f"{value!r}")
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    classes, pairs = classes[counts >= 2], counts[counts >= 2] // 2
    members = [iter(rng.permutation(np.flatnonzero(labels == label))
                    [:2 * count].reshape(-1, 2))
               for label, count in zip(classes, pairs)]
    return [np.concatenate([next(members[position]) for position in plan])
            for plan in _pair_plan(pairs, batch_size, group_size, rng)]
