"""CIFAR-10 made ready for a run (NumPy only): subsets, channel statistics,
normalization, augmentation, and `prepare`, the run's arrays."""

from dataclasses import dataclass

import numpy as np

from experiment import cifar10
from experiment import protocols
from experiment.cli import UsageError
from experiment.cifar10 import DataError

PAD = 4  # the augmentation's zero padding, in pixels


def stratified_subset(labels, size, seed=0):
    """Sorted indices of `size` random examples, the classes as balanced as
    possible (DataError: a class has too few); all where `size` is all."""
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
    """Exact per-channel mean and std of uint8 images scaled to [0, 1]."""
    values = np.arange(256) / 255.0
    pixels = images.reshape(-1, images.shape[-1])
    shares = [np.bincount(channel, minlength=256) / len(pixels)
              for channel in pixels.T]
    mean = np.array([share @ values for share in shares])
    square = np.array([share @ values**2 for share in shares])
    std = np.sqrt(np.maximum(square - mean**2, 0.0)).astype(np.float32)
    return mean.astype(np.float32), np.maximum(std, 1e-3)


def normalization(mean, std):
    """The float32 `scale` and `offset` of `normalize` (x * scale + offset)."""
    scale = (1.0 / (255.0 * np.asarray(std))).astype(np.float32)
    offset = (-np.asarray(mean) / np.asarray(std)).astype(np.float32)
    return scale, offset


def normalize(images, mean, std):
    """uint8 images -> float32 `(x / 255 - mean) / std` per channel."""
    scale, offset = normalization(mean, std)
    return images.astype(np.float32) * scale + offset


def crop_offsets(n, rng):
    """The augmentation's draws for `n` images: top, left offsets, flips."""
    offsets = 2 * PAD + 1
    return rng.integers(0, offsets, n), rng.integers(0, offsets, n), (
        rng.random(n) < 0.5)


def crop_index(index, top, left, flip, height, width, xp=np):
    """The crops' pixels (images `index`) as indices into the `pad`ded
    images' rows; `xp`: NumPy or `keras.ops` (device_data)."""
    rows = top[:, None] + xp.arange(height, dtype="int32")
    cols = xp.arange(width, dtype="int32")
    cols = left[:, None] + xp.where(flip[:, None] > 0, width - 1 - cols, cols)
    return (((index * (height + 2 * PAD))[:, None, None] + rows[:, :, None])
            * (width + 2 * PAD) + cols[:, None, :])


def pad(images):
    """uint8 images `(N, H, W, C)` padded by PAD zeros, as rows `(-1, C)`."""
    padding = ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0))
    return np.pad(images, padding).reshape(-1, images.shape[-1])


def crop(images, top, left, flip):
    """The augmentation: `crop_index`'s crops of uint8 images `(N, H, W, C)`."""
    n, height, width, _ = images.shape
    return pad(images)[crop_index(np.arange(n), top, left, flip, height, width)]


@dataclass
class RunData(cifar10.Cifar10):
    """A run's arrays: training subset, test set, validation normalized."""

    x_val: np.ndarray
    y_val: np.ndarray
    mean: np.ndarray
    std: np.ndarray


DEFAULT_VAL_SHARE = 10  # --val-from train holds out 1 in 10 by default


def prepare(config, data_dir):
    """The run's arrays: `validation_split`, a stratified, seeded subset of
    the rest; None sizes filled in. UsageError: sizes the data cannot give."""
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
    if config["batch_size"] > len(chosen):
        raise UsageError(
            f"--batch-size {config['batch_size']} is more than the "
            f"{len(chosen)} training images (--train-size); a batch "
            "holds at most all of them")
    classes = config["classes_per_batch"]
    present = len(np.unique(y_pool[chosen]))
    if classes and classes > present:
        raise UsageError(
            f"--classes-per-batch {classes} is more than the {present} "
            f"classes among the {len(chosen)} training images")
    return RunData(x_pool[chosen], y_pool[chosen], data.x_test, data.y_test,
                   data.source, normalize(x_val, mean, std), y_val, mean, std)


def validation_split(config, data):
    """The images a run may train on and `val_size` validation images, held
    out of the training set (seeded) or of the test set, stratified."""
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


def check_devices(config, arrays):
    """UsageError where a batch that N devices share does not divide by N."""
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
