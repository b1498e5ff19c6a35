"""What a run makes of CIFAR-10 before training: its subsets, the channel
statistics and normalization, the augmentation, and `prepare`, the run's
arrays from its configuration. NumPy only."""

from dataclasses import dataclass

import numpy as np

from experiment import cifar10
from experiment import protocols
from experiment.cli import UsageError
from experiment.cifar10 import DataError

PAD = 4  # the augmentation's zero padding, in pixels


def stratified_subset(labels, size, seed=0):
    """Indices (sorted) of `size` examples with the classes as balanced as
    possible: `size // 10` of each class, one more for `size % 10` classes
    chosen at random; the examples of each class are drawn at random. All of
    them where `size` is their number.

    Raises:
        DataError: if a class has too few examples.
    """
    labels = np.asarray(labels)
    if size == len(labels):
        return np.arange(size)
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    per_class = np.full(len(classes), size // len(classes))
    per_class[rng.permutation(len(classes))[: size % len(classes)]] += 1
    chosen = []
    for label, count in zip(classes, per_class):
        members = np.flatnonzero(labels == label)
        if count > len(members):
            raise DataError(
                f"cannot take {size} examples stratified: class {label} has "
                f"only {len(members)} (need {count})")
        chosen.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(chosen))


def channel_stats(images):
    """Per-channel mean and standard deviation of uint8 images scaled to [0, 1]
    (exact, from each channel's histogram)."""
    values = np.arange(256) / 255.0
    pixels = images.reshape(-1, images.shape[-1])
    mean, std = [], []
    for channel in range(pixels.shape[1]):
        counts = np.bincount(pixels[:, channel], minlength=256) / len(pixels)
        mean.append(counts @ values)
        std.append(np.sqrt(max(counts @ values**2 - mean[-1] ** 2, 0.0)))
    return (np.asarray(mean, np.float32),
            np.maximum(np.asarray(std, np.float32), 1e-3))


def normalization(mean, std):
    """The float32 `scale` and `offset` of `normalize` (x * scale + offset)."""
    scale = (1.0 / (255.0 * np.asarray(std))).astype(np.float32)
    offset = (-np.asarray(mean) / np.asarray(std)).astype(np.float32)
    return scale, offset


def normalize(images, mean, std):
    """uint8 images -> float32, scaled to [0, 1], then `(x - mean) / std` per
    channel."""
    scale, offset = normalization(mean, std)
    return images.astype(np.float32) * scale + offset


def augment(images, rng, pad=PAD):
    """The standard CIFAR augmentation of uint8 images `(N, H, W, C)`: zero
    padding by `pad` pixels, a random HxW crop, and a horizontal flip with
    probability 1/2, drawn independently per image from `rng`."""
    return crop(images, *crop_offsets(len(images), rng, pad), pad=pad)


def crop_offsets(n, rng, pad=PAD):
    """What `augment` draws from `rng` for `n` images, in this order: each
    crop's top and left offsets in the padded image (0..2 * pad) and whether
    it is flipped; apart from the pixels, so that device_data.py can make the
    same crops on the device."""
    top = rng.integers(0, 2 * pad + 1, n)
    left = rng.integers(0, 2 * pad + 1, n)
    flip = rng.random(n) < 0.5
    return top, left, flip


def crop(images, top, left, flip, pad=PAD):
    """The crops of `crop_offsets` from uint8 images `(N, H, W, C)` padded
    with `pad` zeros on each side, mirrored where `flip`."""
    n, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = top[:, None] + np.arange(height)
    cols = left[:, None] + np.arange(width)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


@dataclass
class RunData:
    """The arrays of a run: its training subset (uint8), its validation
    images (normalized float32), the whole test set (uint8) and the
    normalization, computed on the images it may train on."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    source: str


DEFAULT_VAL_SHARE = 10  # --val-from train holds out 1 in 10 by default


def prepare(config, data_dir):
    """Loads CIFAR-10 and cuts the run's arrays: `val_size` validation
    images held out of the training set (`val_from` "train": stratified,
    drawn with the seed) or of the test set ("test": stratified, the same
    for every run), and a stratified subset of `train_size` of the other
    training images, drawn with the seed. Fills in the sizes that are None
    (a tenth of the training set held out; all test images; all the rest).

    Raises:
        DataError: the data cannot be read.
        UsageError: a size or `classes_per_batch` the data cannot give.
    """
    data = cifar10.load(data_dir)
    x_pool, y_pool, x_val, y_val = validation_split(config, data)
    config["train_size"] = config["train_size"] or len(x_pool)
    if config["train_size"] > len(x_pool):
        raise UsageError(
            f"--train-size {config['train_size']} is more than the "
            f"{len(x_pool)} training images in {data.source}"
            + (f" less the {config['val_size']} held out for validation"
               if config["val_from"] == "train" else ""))
    mean, std = channel_stats(x_pool)
    chosen = stratified_subset(y_pool, config["train_size"], config["seed"])
    check_batches(config, y_pool[chosen])
    return RunData(x_pool[chosen], y_pool[chosen], normalize(x_val, mean, std),
                   y_val, data.x_test, data.y_test, mean, std, data.source)


def validation_split(config, data):
    """The images a run may train on and its validation images (uint8),
    as `val_from` and `val_size` say (see `prepare`)."""
    train_from = config["val_from"] == "train"
    images, labels = ((data.x_train, data.y_train) if train_from
                      else (data.x_test, data.y_test))
    config["val_size"] = config["val_size"] or (
        len(images) // DEFAULT_VAL_SHARE if train_from else len(images))
    limit = len(images) - 1 if train_from else len(images)
    if config["val_size"] > limit:
        raise UsageError(
            f"--val-size {config['val_size']} is more than the {limit} "
            f"{'training' if train_from else 'test'} images in {data.source}"
            + (" that can be held out (some must be left to train on)"
               if train_from else ""))
    chosen = stratified_subset(labels, config["val_size"],
                               config["seed"] if train_from else 0)
    rest = np.setdiff1d(np.arange(len(images)), chosen)
    pool = (images[rest], labels[rest]) if train_from else (data.x_train,
                                                             data.y_train)
    return *pool, images[chosen], labels[chosen]


def check_batches(config, labels):
    """Whether batches of the run can be drawn from its training labels."""
    if config["batch_size"] > len(labels):
        raise UsageError(
            f"--batch-size {config['batch_size']} is more than the "
            f"{len(labels)} training images (--train-size); a batch "
            "holds at most all of them")
    classes = config["classes_per_batch"]
    present = len(np.unique(labels))
    if classes and classes > present:
        raise UsageError(
            f"--classes-per-batch {classes} is more than the {present} "
            f"classes among the {len(labels)} training images")


def check_devices(config, arrays):
    """With data parallel training on N devices, every batch that devices
    share must divide by N: the training batches (the epoch's last too), the
    evaluation batches, the validation and test sets.

    Raises:
        UsageError: naming the size that does not divide.
    """
    n = config["devices"]
    if n == 1:
        return
    if config["classes_per_batch"]:
        raise UsageError(f"--classes-per-batch with --devices {n} is not "
                         "supported (its batches differ in size)")
    if config["sampling"] == "pairs":
        raise UsageError(f"--sampling pairs with --devices {n} is not "
                         "supported (its epoch's last batch is of the pairs "
                         "left, whatever their number)")
    # Again with the number of devices resolved (--devices all).
    protocols.check_virtual_batch_size(config)
    for what, size in [
            ("--batch-size", config["batch_size"]),
            ("the epoch's last batch (--train-size modulo --batch-size)",
             len(arrays.y_train) % config["batch_size"]),
            ("--eval-batch-size", config["eval_batch_size"]),
            ("--val-size", len(arrays.y_val)),
            ("the test set", len(arrays.y_test))]:
        if size % n:
            raise UsageError(
                f"{what} {size} does not divide by --devices {n}: each "
                "device takes an equal share of every batch")
