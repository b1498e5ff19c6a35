"""The non-i.i.d. sampler of experiment/sampling.py: every training batch
from exactly K classes, every training image once per epoch (NumPy only, no
Keras)."""

import itertools

import numpy as np
import pytest

from experiment import sampling

pytestmark = pytest.mark.backend_independent



def labels_with(counts, seed=0):
    """Shuffled labels with `counts[c]` examples of class c."""
    labels = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
    return np.random.default_rng(seed).permutation(labels)


def check_epoch(labels, batch_size, classes, batches):
    """Exactly `classes` classes per batch; each example exactly once."""
    assert all(len(np.unique(labels[batch])) == classes for batch in batches)
    used = np.concatenate(batches)
    assert len(used) == len(labels)
    assert np.array_equal(np.sort(used), np.arange(len(labels)))
    assert len(batches) == sampling.steps_per_epoch(labels, batch_size,
                                                    classes)


BALANCED = [
    (10 * [50], 4, 2),      # the paper's pairs at batch 4
    (10 * [48], 8, 4),      # pairs at batch 8
    (10 * [64], 32, 2),
    (10 * [50], 10, 5),
    (10 * [500], 20, 10),   # every class in every batch
    (10 * [48], 6, 1),      # one class per batch
    (10 * [10], 5, 5),      # one image per class
]


@pytest.mark.parametrize("counts, batch_size, classes", BALANCED)
def test_balanced_classes_give_full_batches(counts, batch_size, classes):
    labels = labels_with(counts)
    for seed in range(3):
        batches = sampling.class_batches(labels, batch_size, classes,
                                        np.random.default_rng(seed))
        check_epoch(labels, batch_size, classes, batches)
        # Each class count is a multiple of B / K, and K divides the number
        # of groups: every batch has exactly B examples, B / K per class.
        assert {len(b) for b in batches} == {batch_size}
        for batch in batches:
            assert set(np.bincount(labels[batch])) <= {0,
                                                       batch_size // classes}


@pytest.mark.parametrize("counts, batch_size, classes", [
    (10 * [50], 128, 2),    # 50 = 64 * 0 + 50: one short group per class
    (10 * [400], 128, 2),   # 400 = 6 * 64 + 16
    (10 * [5], 8, 4),       # groups of 2; 30 groups, K = 4: 2 left over
    (10 * [51], 4, 2),      # 51 = 25 * 2 + 1
    ([13, 7, 20, 1, 9, 30, 5, 5, 5, 2], 6, 3),     # unbalanced
    ([100, 3, 3, 3], 4, 2),                         # one class dominates
    ([20, 20, 2], 4, 2),    # the small class is in a batch all the same
    ([40, 40, 40], 9, 3),
    (10 * [1], 2, 2),
])
def test_uneven_classes_still_k_classes_and_every_image_once(
        counts, batch_size, classes):
    labels = labels_with(counts, seed=1)
    for seed in range(3):
        batches = sampling.class_batches(labels, batch_size, classes,
                                        np.random.default_rng(seed))
        check_epoch(labels, batch_size, classes, batches)


def test_random_cases():
    """Many random class counts, batch sizes and K."""
    rng = np.random.default_rng(7)
    for _ in range(60):
        num_classes = int(rng.integers(1, 11))
        counts = rng.integers(1, 40, num_classes)
        classes = int(rng.integers(1, num_classes + 1))
        batch_size = classes * int(rng.integers(1, 9))
        labels = labels_with(counts, seed=int(rng.integers(1000)))
        batches = sampling.class_batches(labels, batch_size, classes, rng)
        check_epoch(labels, batch_size, classes, batches)


def test_nearly_all_batches_are_full_on_a_cifar_sized_subset():
    labels = labels_with(10 * [500])  # a stratified 5000-image subset
    for batch_size in (4, 8, 32, 128):
        batches = sampling.class_batches(labels, batch_size, 2,
                                        np.random.default_rng(0))
        check_epoch(labels, batch_size, 2, batches)
        sizes = np.array([len(b) for b in batches])
        # Only the batches of the classes' last, shorter groups differ
        # (500 = 7 * 64 + 52 at batch 128: 5 batches of 104).
        assert (sizes <= batch_size).all()
        assert (sizes < batch_size).sum() <= 5


def test_reproducible_from_the_rng():
    labels = labels_with(10 * [30])

    def epoch(seed, number):
        return sampling.class_batches(labels, 6, 3,
                                     sampling.epoch_rng(seed, number))

    first = epoch(0, 0)
    again = epoch(0, 0)
    assert len(first) == len(again)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    for other in (epoch(0, 1), epoch(1, 0)):
        assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_classes_are_mixed_at_random():
    """With pairs of classes, an epoch pairs each class with many others, and
    the batches are not in class order."""
    labels = labels_with(10 * [40])
    batches = sampling.class_batches(labels, 4, 2, np.random.default_rng(0))
    pairs = {tuple(np.unique(labels[b])) for b in batches}
    assert len(pairs) > 30  # of the 45 pairs of 10 classes
    counts = np.array([np.bincount(labels[b], minlength=10) for b in batches])
    assert (counts.max(axis=0) == 2).all()  # a class gives a pair
    first_batch = [np.flatnonzero(c)[0] for c in counts]
    assert first_batch != sorted(first_batch)


def test_number_of_batches_does_not_depend_on_the_rng():
    for counts in ([13, 7, 20, 1, 9, 30, 5, 5, 5, 2], 10 * [33], [8, 1, 1]):
        labels = labels_with(counts)
        lengths = {len(sampling.class_batches(labels, 4, 2,
                                             np.random.default_rng(seed)))
                   for seed in range(5)}
        assert lengths == {sampling.steps_per_epoch(labels, 4, 2)}


@pytest.mark.parametrize("batch_size, classes, words", [
    (32, 3, ["3", "divide", "32"]),
    (32, 16, ["16", "the 10 classes"]),
    (8, 0, ["integer from 1", "not 0"]),
    (8, 2.0, ["integer from 1", "not 2.0"]),
])
def test_bad_classes_per_batch(batch_size, classes, words):
    labels = labels_with(10 * [20])
    for call in (lambda: sampling.class_batches(
                     labels, batch_size, classes, np.random.default_rng(0)),
                 lambda: sampling.steps_per_epoch(labels, batch_size,
                                                  classes)):
        with pytest.raises(ValueError) as error:
            call()
        for word in words:
            assert word in str(error.value)


def tiny_images(labels):
    """Images whose pixels all hold their index, to follow them."""
    index = np.arange(len(labels), dtype=np.uint8)
    return index[:, None, None, None] * np.ones((1, 32, 32, 3), np.uint8)


def test_train_batches_with_classes_per_batch():
    labels = labels_with(10 * [12])
    images = tiny_images(labels)
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32) / 255.0

    def epoch(number, augmented=False):
        return list(sampling.train_batches(
            images, labels, 6, mean, std, sampling.epoch_rng(0, number),
            augmented=augmented, classes_per_batch=3))

    batches = epoch(0)
    assert len(batches) == sampling.steps_per_epoch(labels, 6, 3) == 20
    seen = []
    for x, y in batches:
        assert x.dtype == np.float32 and x.shape == (6, 32, 32, 3)
        assert len(np.unique(y)) == 3
        index = x[:, 0, 0, 0].astype(int)
        assert np.array_equal(labels[index], y)  # images follow their labels
        seen.extend(index)
    assert sorted(seen) == list(range(len(labels)))
    assert [y.tolist() for _, y in batches] == [y.tolist()
                                               for _, y in epoch(0)]
    assert [y.tolist() for _, y in batches] != [y.tolist()
                                               for _, y in epoch(1)]
    augmented = epoch(0, augmented=True)
    assert all(len(np.unique(y)) == 3 for _, y in augmented)


def test_iid_batches_are_unchanged():
    """Without classes_per_batch, the batches are those of a permutation from
    the epoch's rng, as before the sampler existed (so that runs repeat)."""
    labels = labels_with(10 * [7])
    images = tiny_images(labels)
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32) / 255.0
    batches = list(sampling.train_batches(images, labels, 8, mean, std,
                                         sampling.epoch_rng(3, 2)))
    order = sampling.epoch_rng(3, 2).permutation(len(labels))
    expected = [order[i:i + 8] for i in range(0, len(order), 8)]
    assert len(batches) == sampling.steps_per_epoch(labels, 8) == 9
    for (x, y), index in itertools.zip_longest(batches, expected):
        assert np.array_equal(x[:, 0, 0, 0].astype(int), index)
        assert np.array_equal(y, labels[index])


# ------------------------------------------------ pairs in normalization groups
def check_pairs(labels, batch_size, group, batches):
    """The pairs property of every batch, the last one too: whole pairs of
    one class; within each group of `group` consecutive examples (from the
    batch's start, the last group smaller), distinct classes up to the
    number of classes, and beyond it every class within one pair of the
    others; every example at most once; as many batches as announced."""
    classes = len(np.unique(labels))
    for batch in batches:
        assert len(batch) % 2 == 0 and len(batch) <= batch_size
        y = labels[batch]
        assert np.array_equal(y[0::2], y[1::2])  # pairs of one class
        for start in range(0, len(batch), group):
            pairs = y[start : start + group][0::2]
            counts = np.bincount(pairs, minlength=classes)
            if len(pairs) <= classes:
                assert counts.max() == 1, (start, pairs)  # distinct
            else:
                assert counts.max() - counts.min() <= 1, (start, counts)
    assert all(len(b) == batch_size for b in batches[:-1])
    used = np.concatenate(batches)
    assert len(np.unique(used)) == len(used)  # each example at most once
    assert len(batches) == sampling.steps_per_epoch(labels, batch_size,
                                                    pairs=group)
    return used


@pytest.mark.parametrize("group", [2, 4, 8, 16, 128])
@pytest.mark.parametrize("counts", [
    10 * [500],               # a stratified 5000-image subset: 39 batches + 8
    10 * [503],               # odd counts: each class's odd image waits
    10 * [64],                # 640 images: 5 full batches of 128
    [60, 61, 59, 70, 40, 50, 64, 66, 58, 62],   # nearly balanced
])
def test_pairs_property_in_every_group_and_the_last_batch(counts, group):
    labels = labels_with(counts, seed=2)
    for seed in range(2):
        batches = sampling.pair_batches(labels, 128, group,
                                        sampling.epoch_rng(seed, 0))
        used = check_pairs(labels, 128, group, batches)
        pairs = sum(c // 2 for c in counts)
        if len(set(counts)) == 1:
            # Balanced classes: every pair is used, only odd images wait.
            assert len(used) == 2 * pairs
        else:
            # The epoch ends only when a group cannot be filled, which
            # takes a class without pairs left.
            left = np.array(counts) // 2 - np.bincount(
                labels[used], minlength=len(counts)) // 2
            assert (left == 0).any()


def test_pairs_on_a_cifar_subset_last_batch_and_group_counts():
    """5000 images in batches of 128: 39 full batches and a last one of the
    8 images left, 4 pairs of 4 classes; at V = 128 each of the 10 classes
    gives 6 or 7 of a full batch's 64 pairs."""
    labels = labels_with(10 * [500])
    batches = sampling.pair_batches(labels, 128, 128,
                                    np.random.default_rng(0))
    assert [len(b) for b in batches] == 39 * [128] + [8]
    assert len(np.unique(labels[batches[-1]][0::2])) == 4
    for batch in batches[:-1]:
        assert set(np.bincount(labels[batch][0::2], minlength=10)) <= {6, 7}
    assert sampling.steps_per_epoch(labels, 128, pairs=4) == 40
    # Groups of 4 in a batch of 128: 32 groups of 2 pairs of 2 classes; the
    # batch as a whole still holds every class about equally.
    batch = sampling.pair_batches(labels, 128, 4, np.random.default_rng(0))[0]
    assert set(np.bincount(labels[batch], minlength=10)) <= {12, 14}


def test_pairs_group_that_does_not_divide_the_batch():
    """Groups counted from each batch's start: with G = 12 and batches of
    32, groups of 12, 12 and 8 in every batch."""
    labels = labels_with(10 * [40])
    batches = sampling.pair_batches(labels, 32, 12, np.random.default_rng(1))
    for batch in batches:
        y = labels[batch]
        for start, end in ((0, 12), (12, 24), (24, 32)):
            pairs = y[start:end][0::2]
            assert len(np.unique(pairs)) == len(pairs)


def test_pairs_of_a_dominant_class_end_the_epoch_early():
    """One class holding most pairs: groups of distinct classes run out of
    partners, and the epoch ends with the first group that cannot be
    filled, the rest waiting."""
    labels = labels_with([100, 4, 4, 4])  # 50, 2, 2, 2 pairs
    batches = sampling.pair_batches(labels, 8, 4, np.random.default_rng(0))
    used = check_pairs(labels, 8, 4, batches)
    assert len(used) < len(labels)
    assert [len(b) for b in batches] == [8, 8, 8, 2]


def test_pairs_repeat_from_the_rng_and_agree_with_train_batches():
    labels = labels_with(10 * [20])  # tiny_images: at most 256 images
    images = tiny_images(labels)
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32) / 255.0

    def plan(seed, epoch):
        return sampling.pair_batches(labels, 16, 4,
                                     sampling.epoch_rng(seed, epoch))

    first = plan(0, 0)
    assert all(np.array_equal(a, b) for a, b in zip(first, plan(0, 0)))
    assert not all(np.array_equal(a, b) for a, b in zip(first, plan(0, 1)))
    batches = list(sampling.train_batches(images, labels, 16, mean, std,
                                          sampling.epoch_rng(0, 0),
                                          pairs=4))
    assert len(batches) == sampling.steps_per_epoch(labels, 16, pairs=4)
    for (x, y), index in zip(batches, first):
        assert np.array_equal(x[:, 0, 0, 0].astype(int), index)
        assert np.array_equal(y, labels[index])


def test_pairs_tie_breaks_mix_the_classes():
    """Balanced classes tie at every group: over an epoch of groups of 2
    pairs, a class meets many others, not a fixed partner."""
    labels = labels_with(10 * [40])
    batches = sampling.pair_batches(labels, 4, 4, np.random.default_rng(0))
    partners = {tuple(sorted(np.unique(labels[b]))) for b in batches}
    assert len(partners) > 30  # of the 45 pairs of 10 classes


@pytest.mark.parametrize("batch_size, group, words", [
    (127, 4, ["even batch_size", "127"]),
    (128, 3, ["even group_size", "3"]),
    (128, 0, ["even group_size"]),
])
def test_bad_pairs(batch_size, group, words):
    labels = labels_with(10 * [20])
    with pytest.raises(ValueError) as error:
        sampling.pair_batches(labels, batch_size, group,
                              np.random.default_rng(0))
    for word in words:
        assert word in str(error.value)
