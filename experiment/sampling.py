"""Batch plans (i.i.d., K classes per batch, pairs: docs/experiment.md,
docs/sweep.md), one for the host (`train_batches`) and `device_data`."""

import numpy as np

from experiment import protocols
from experiment.preprocessing import crop
from experiment.preprocessing import crop_offsets
from experiment.preprocessing import normalize


def epoch_rng(seed, epoch):
    """One epoch's generator: the same for (seed, epoch), also on resume."""
    return np.random.default_rng([seed, epoch])


def options(config):
    """A run's sampling: the keyword arguments of `batch_plan` after `rng`."""
    return {"batch_size": config["batch_size"],
            "classes_per_batch": config["classes_per_batch"],
            "pairs": protocols.pairs_group(config)}


def steps_per_epoch(labels, batch_size, classes_per_batch=None, pairs=None):
    """The number of batches of an epoch's plan (the same for every rng)."""
    return sum(1 for _ in batch_plan(labels, batch_size, epoch_rng(0, 0),
                                     False, classes_per_batch, pairs))


def batch_plan(labels, batch_size, rng, augmented=False,
               classes_per_batch=None, pairs=None):
    """Everything random in an epoch, drawn from `rng` in this order: each
    batch's indices and, if `augmented`, their `crop_offsets` (else None);
    `class_batches`, `pair_batches` (flags.py refuses both) or, i.i.d., a
    permutation cut into batches, the last smaller."""
    if classes_per_batch is not None:
        batches = class_batches(labels, batch_size, classes_per_batch, rng)
    elif pairs is not None:
        batches = pair_batches(labels, batch_size, pairs, rng)
    else:
        order = rng.permutation(len(labels))
        batches = (order[start:start + batch_size]
                   for start in range(0, len(order), batch_size))
    for index in batches:
        yield index, crop_offsets(len(index), rng) if augmented else None


def train_batches(images, labels, batch_size, mean, std, rng, augmented=False,
                  classes_per_batch=None, pairs=None, share=None):
    """One epoch of normalized host batches `(x float32, y int32)`; `share`
    (hosts.Processes.share): this process's part of each, drawn whole."""
    for index, offsets in batch_plan(labels, batch_size, rng, augmented,
                                     classes_per_batch, pairs):
        if share is not None:
            index = share(index)
            offsets = offsets and tuple(map(share, offsets))
        x = images[index]
        if offsets is not None:
            x = crop(x, *offsets)
        yield normalize(x, mean, std), labels[index]


def class_batches(labels, batch_size, classes_per_batch, rng):
    """One epoch's batches (index arrays into `labels`) of exactly K classes
    (docs/sweep.md): groups of batch_size / K from the K classes with the
    most groups left, those not chosen yet first, then at random; leftovers
    join batches of their class. ValueError: K not a divisor in 1..classes."""
    k, labels = classes_per_batch, np.asarray(labels)
    classes = np.unique(labels)
    if (isinstance(k, bool) or not isinstance(k, (int, np.integer))
            or not 1 <= k <= len(classes) or batch_size % k):
        raise ValueError(f"classes_per_batch must divide batch_size "
                         f"{batch_size} and be an integer from 1 to the "
                         f"{len(classes)} classes of the data, not {k!r}")
    per_group = batch_size // k
    counts, groups = [], []
    for label in classes:
        members = rng.permutation(np.flatnonzero(labels == label))
        starts = range(0, len(members), per_group)
        counts.append(len(starts))
        groups.append(iter([members[i:i + per_group] for i in starts]))
    left = np.array(counts, dtype=np.int64)
    unused = np.ones(len(left), dtype=np.int64)
    batches, holders = [], [[] for _ in groups]
    while np.count_nonzero(left) >= k:
        chosen = np.lexsort((rng.random(len(left)), -unused, -left))[:k]
        left[chosen] -= 1
        unused[chosen] = 0
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


def _group_pairs(left, pairs_wanted, rng):
    """A group's classes (positions in `left`, decremented): rounds of a pair
    per class with any, most left first, ties at random; a short round ends."""
    taken = []
    while len(taken) < pairs_wanted:
        order = np.lexsort((rng.random(len(left)), -left))
        order = order[left[order] > 0][:pairs_wanted - len(taken)]
        left[order] -= 1
        taken.extend(order.tolist())
        if len(taken) < pairs_wanted and len(order) < len(left):
            break
    return taken


def pair_batches(labels, batch_size, group_size, rng):
    """The paper's pairs (docs/experiment.md): index arrays into `labels`, a
    class at 2i, 2i + 1, distinct ones per group of `group_size`, until a
    group cannot be filled. ValueError: a size not even and >= 2."""
    for name, value in (("batch_size", batch_size),
                        ("group_size", group_size)):
        if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                or value < 2 or value % 2):
            raise ValueError(f"pairs need an even {name} >= 2, not {value!r}")
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    classes, left = classes[counts >= 2], counts[counts >= 2] // 2
    members = [iter(rng.permutation(np.flatnonzero(labels == label))
                    [:2 * count].reshape(-1, 2))
               for label, count in zip(classes, left)]
    group = min(group_size, batch_size)
    sizes = [min(group, batch_size - start) // 2
             for start in range(0, batch_size, group)]
    plans, full = [], True
    while full and left.any():
        plans.append([])
        for wanted in sizes:
            taken = _group_pairs(left, wanted, rng)
            plans[-1].extend(taken)
            full = len(taken) == wanted
            if not full:  # no more full groups this epoch
                break
    return [np.concatenate([next(members[position]) for position in plan])
            for plan in plans]
