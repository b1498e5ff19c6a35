"""Batch plans: which training images go into each batch of an epoch, in
which order and with which crops; i.i.d. (a random permutation) or
non-i.i.d. (every batch from exactly K classes; or the paper's pairs of
images of a class, distinct classes within each normalization group).
`train_batches` makes the batches on the host with NumPy;
`experiment.device_data` makes the same batches on the device from the same
plan."""

import numpy as np

from experiment.preprocessing import crop
from experiment.preprocessing import crop_offsets
from experiment.preprocessing import normalize


# ---------------------------------------------------------------------- batches


def num_batches(size, batch_size):
    return -(-size // batch_size)


def epoch_rng(seed, epoch):
    """The random generator of one epoch: the same for the same (seed, epoch),
    so shuffling and augmentation repeat, also after a resume."""
    return np.random.default_rng([seed, epoch])


def steps_per_epoch(labels, batch_size, classes_per_batch=None, pairs=None):
    """The number of batches `train_batches` yields in one epoch (any rng)."""
    if classes_per_batch:
        return num_class_batches(labels, batch_size, classes_per_batch)
    if pairs:
        return num_pair_batches(labels, batch_size, pairs)
    return num_batches(len(labels), batch_size)


def train_batches(images, labels, batch_size, mean, std, rng, augmented=False,
                  classes_per_batch=None, pairs=None, share=None):
    """One epoch of normalized training batches `(x float32, y int32)`,
    augmented with `rng` if `augmented`.

    i.i.d. (`classes_per_batch` and `pairs` None): the examples in the
    random order of `rng`, cut into batches of `batch_size` (the last one
    smaller where the size does not divide). Non-i.i.d.: with
    `classes_per_batch` K, the batches of `class_batches`, each from exactly
    K classes; with `pairs` G, those of `pair_batches`, pairs of a class
    in normalization groups of G. `share`: a function that keeps one
    process's part of each batch (hosts.Processes.share), applied to the
    plan, after the whole plan is drawn: every process draws the same."""
    for index, offsets in batch_plan(labels, batch_size, rng, augmented,
                                     classes_per_batch, pairs):
        if share is not None:
            index = share(index)
            offsets = offsets and tuple(map(share, offsets))
        x = images[index]
        if offsets is not None:
            x = crop(x, *offsets)
        yield normalize(x, mean, std), labels[index]


def batch_plan(labels, batch_size, rng, augmented=False,
               classes_per_batch=None, pairs=None):
    """Everything random in an epoch of `train_batches`, drawn from `rng` in
    the same order: for each batch, the indices of its examples and, if
    `augmented`, their `crop_offsets` (else None). Both the host batches and
    the device batches (device_data.py) are made from it, so they agree."""
    if classes_per_batch and pairs:
        raise ValueError("classes_per_batch and pairs exclude each other "
                         "(two samplings)")
    if classes_per_batch:
        batches = class_batches(labels, batch_size, classes_per_batch, rng)
    elif pairs:
        batches = pair_batches(labels, batch_size, pairs, rng)
    else:
        order = rng.permutation(len(labels))
        batches = (order[start : start + batch_size]
                   for start in range(0, len(order), batch_size))
    for index in batches:
        yield index, crop_offsets(len(index), rng) if augmented else None

# ------------------------------------------------------ non-i.i.d. batches


def check_classes_per_batch(labels, batch_size, classes_per_batch):
    """Raises ValueError unless batches of `batch_size` examples can be drawn
    from exactly `classes_per_batch` of the classes in `labels`."""
    k = classes_per_batch
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"classes_per_batch must be a positive integer, "
                         f"not {k!r}")
    if batch_size % k:
        raise ValueError(f"classes_per_batch {k} must divide batch_size "
                         f"{batch_size} (each class gives batch_size / "
                         f"classes_per_batch examples to a batch)")
    present = len(np.unique(np.asarray(labels)))
    if k > present:
        raise ValueError(f"classes_per_batch {k} is more than the {present} "
                         f"classes in the training data")


def _class_groups(labels, batch_size, classes_per_batch):
    """The classes of `labels`, the group size m = batch_size /
    classes_per_batch, and how many groups of m examples (the last one
    possibly smaller) each class is cut into."""
    labels = np.asarray(labels)
    check_classes_per_batch(labels, batch_size, classes_per_batch)
    per_group = batch_size // classes_per_batch
    classes, counts = np.unique(labels, return_counts=True)
    return classes, per_group, -(-counts // per_group)


def _greedy_batches(groups, classes_per_batch, rng=None):
    """Which classes (positions in `groups`) give a group to each batch: the
    `classes_per_batch` classes with the most groups left, until fewer than
    that have any. Among tied classes, those not chosen yet come first (so
    every class is in some batch), then the order is random (with `rng`; by
    position without one). How many batches this makes depends on `groups`
    only: whichever tied classes are taken, the counts left are the same."""
    left = np.array(groups, dtype=np.int64)
    unused = np.ones(len(left), dtype=np.int64)
    chosen = []
    while np.count_nonzero(left) >= classes_per_batch:
        ties = (rng.random(len(left)) if rng is not None
                else np.arange(len(left)))
        order = np.lexsort((ties, -unused, -left))[:classes_per_batch]
        chosen.append(order)
        left[order] -= 1
        unused[order] = 0
    return chosen


def num_class_batches(labels, batch_size, classes_per_batch):
    """The number of batches `class_batches` makes (the same for every rng)."""
    _, _, groups = _class_groups(labels, batch_size, classes_per_batch)
    return len(_greedy_batches(groups, classes_per_batch))


def class_batches(labels, batch_size, classes_per_batch, rng):
    """One epoch of non-i.i.d. batches: a list of index arrays into `labels`,
    each batch holding examples of exactly `classes_per_batch` (K) classes,
    every example in exactly one batch.

    Each class's examples are shuffled and cut into groups of
    m = batch_size / K (the class's last group smaller where m does not divide
    its count). Each batch takes the next group of each of the K classes with
    the most groups left (ties broken at random), so it holds exactly K
    classes and, but for the few batches made of the classes' last groups,
    batch_size examples. With balanced classes the classes take turns evenly
    (with 10 classes and K = 2, each run of 5 batches pairs the 10 classes at
    random). Groups still left when fewer than K classes have any (none when K
    divides the number of groups and the classes are balanced, as with K = 2
    on a subset of CIFAR-10 whose size is a multiple of 10) each join a
    different random batch that already holds their class, which makes that
    batch larger than batch_size. The batches come in random order.
    Everything is drawn from `rng`; the number of batches depends only on the
    class counts (`num_class_batches`). The paper's non-i.i.d. minibatches are
    pairs of examples of one class: K = batch_size / 2.

    Raises:
        ValueError: if K does not divide batch_size, or there are fewer than K
            classes in `labels`.
    """
    labels = np.asarray(labels)
    classes, per_group, groups = _class_groups(labels, batch_size,
                                               classes_per_batch)
    class_groups = []
    for label in classes:
        members = rng.permutation(np.flatnonzero(labels == label))
        class_groups.append([members[start : start + per_group]
                             for start in range(0, len(members), per_group)])
    used = [0] * len(classes)
    batches, holders = [], [[] for _ in classes]
    for chosen in _greedy_batches(groups, classes_per_batch, rng):
        parts = []
        for position in chosen:
            parts.append(class_groups[position][used[position]])
            used[position] += 1
            holders[position].append(len(batches))
        batches.append(parts)
    extended = set()
    for position in range(len(classes)):
        for group in class_groups[position][used[position]:]:
            candidates = [b for b in holders[position] if b not in extended]
            target = int(rng.choice(candidates or holders[position]))
            extended.add(target)
            batches[target].append(group)
    return [np.concatenate(batches[i]) for i in rng.permutation(len(batches))]


# ------------------------------------------------ pairs in normalization groups


def check_pairs(batch_size, group_size):
    """Raises ValueError unless batches of `batch_size` and normalization
    groups of `group_size` examples can be made of whole pairs."""
    for name, value in (("batch_size", batch_size),
                        ("group_size", group_size)):
        if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                or value < 2 or value % 2):
            raise ValueError(f"pairs need an even {name} >= 2, not "
                             f"{value!r}")


def _group_pairs(left, pairs_wanted, rng=None):
    """The classes (positions in `left`, the pairs each has left, which
    this decrements) of one normalization group's pairs, in the group's
    order: taken in rounds, each one pair of every class that has any, those
    with the most left first (ties at random with `rng`, by position
    without), until the group has `pairs_wanted`. A round that finds a class
    without pairs ends the group there if it is not full (it could only go
    on by doubling a class that another lacks), and with it the epoch."""
    taken = []
    while len(taken) < pairs_wanted:
        ties = (rng.random(len(left)) if rng is not None
                else np.arange(len(left)))
        order = np.lexsort((ties, -left))
        order = order[left[order] > 0][:pairs_wanted - len(taken)]
        left[order] -= 1
        taken.extend(order.tolist())
        if len(taken) < pairs_wanted and len(order) < len(left):
            break
    return taken


def _pair_plan(pair_counts, batch_size, group_size, rng=None):
    """Which class (a position in `pair_counts`) gives each pair of each
    batch, in order: batches of batch_size / 2 pairs, each cut from its
    start into normalization groups of group_size / 2 pairs (the batch's
    last group smaller where group_size does not divide batch_size), filled
    by `_group_pairs` until a group cannot be filled. How many batches and
    pairs this makes depends on `pair_counts` only (tied classes are
    interchangeable), as with `_greedy_batches`."""
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


def _class_pairs(labels, batch_size, group_size):
    """The labels as an array, the classes that have a pair, and how many
    pairs each has. A class of one example has none: left out, it would
    count as a class without pairs and end every group at its first round."""
    labels = np.asarray(labels)
    check_pairs(batch_size, group_size)
    classes, counts = np.unique(labels, return_counts=True)
    keep = counts >= 2
    return labels, classes[keep], counts[keep] // 2


def num_pair_batches(labels, batch_size, group_size):
    """The number of batches `pair_batches` makes (the same for every
    rng)."""
    _, _, pairs = _class_pairs(labels, batch_size, group_size)
    return len(_pair_plan(pairs, batch_size, group_size))


def pair_batches(labels, batch_size, group_size, rng):
    """One epoch of the paper's non-i.i.d. batches (Ioffe 2017, section 4):
    a list of index arrays into `labels`, each batch made of pairs of
    examples of one class (positions 2i and 2i + 1), and within each
    normalization group of `group_size` (G) consecutive examples, counted
    from the batch's start as the layer's virtual batches are, G/2 pairs of
    G/2 distinct classes where G/2 is at most the number of classes C
    with a pair (CIFAR-10: 10), and beyond that every class in the group,
    their numbers of pairs differing by at most one (G = 128: 6 or 7 pairs
    of each of the 10 classes).

    Each class's examples are shuffled and cut into pairs (a class's odd
    example waits for another epoch). Groups are filled in order, batch
    after batch, each by rounds of one pair of every class, those with the
    most pairs left first, ties at random (`_group_pairs`): so the classes
    stay balanced over the epoch and a batch of many groups holds them all
    about equally. The epoch ends with the first group that cannot be
    filled so (fewer classes have pairs left than it needs): that group and
    its batch are the epoch's last, shorter ones; the pairs left, at most a
    group's with balanced classes, are not used this epoch. So every example
    is used at most once per epoch, every batch but the last has
    batch_size examples, and the number of batches depends only on the class
    counts (`num_pair_batches`). Everything is drawn from `rng`.

    Raises:
        ValueError: if batch_size or group_size is not an even number >= 2.
    """
    labels, classes, pairs = _class_pairs(labels, batch_size, group_size)
    members = [rng.permutation(np.flatnonzero(labels == label))
               for label in classes]
    used = [0] * len(classes)
    batches = []
    for plan in _pair_plan(pairs, batch_size, group_size, rng):
        parts = []
        for position in plan:
            start = 2 * used[position]
            parts.append(members[position][start : start + 2])
            used[position] += 1
        batches.append(np.concatenate(parts))
    return batches
