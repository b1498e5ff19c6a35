"""CIFAR-10 for the experiment: loading, checks, normalization, subsets,
augmentation and batches. NumPy only (Keras is imported only to download).

The data is read from a folder in the official python layout
(`cifar-10-batches-py`: `data_batch_1` ... `data_batch_5`, `test_batch`,
each a pickled dict with `data`, an `(N, 3072)` uint8 array of channel-major
32x32 RGB images, and `labels`, N integers in 0..9), found in this order:

1. the `data_dir` argument (`--data-dir`),
2. the `CIFAR10_DIR` environment variable,
3. Keras's downloader (`keras.datasets.cifar10`, which caches it in
   `~/.keras/datasets`), where a network exists.

A folder that holds `cifar-10-batches-py` may be given for that folder. Every
file is checked; a missing, truncated or wrong-shaped one raises `DataError`
with a one-line message naming it.
"""

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
FOLDER = "cifar-10-batches-py"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
HOW_TO_GET_IT = (
    f"download {URL}, extract it (tar xzf cifar-10-python.tar.gz) and pass "
    f"--data-dir /path/to/{FOLDER} or set CIFAR10_DIR to that folder"
)
IMAGE_SHAPE = (32, 32, 3)


class DataError(Exception):
    """CIFAR-10 cannot be found or read; the message says which file and why."""


@dataclass
class Cifar10:
    """The dataset as uint8 images `(N, 32, 32, 3)` and int32 labels `(N,)`."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str  # the folder it was read from, or how it was obtained


# --------------------------------------------------------------------- loading


def load(data_dir=None):
    """Loads CIFAR-10 from `data_dir`, `$CIFAR10_DIR` or Keras's downloader.

    Raises:
        DataError: with a one-line message naming the folder or file at fault,
            or saying how to provide the data when there is none.
    """
    if data_dir is None and os.environ.get("CIFAR10_DIR"):
        return load_folder(os.environ["CIFAR10_DIR"], origin="CIFAR10_DIR")
    if data_dir is not None:
        return load_folder(data_dir, origin="--data-dir")
    return download()


def load_folder(folder, origin="--data-dir"):
    """Loads and checks the official python layout in `folder`."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"CIFAR-10 folder {str(folder)!r} (from {origin}) does not exist "
            f"or is not a folder; {HOW_TO_GET_IT}"
        )
    if not (folder / TEST_FILE).exists() and (folder / FOLDER).is_dir():
        folder = folder / FOLDER
    train = [read_batch(folder / name) for name in TRAIN_FILES]
    x_test, y_test = read_batch(folder / TEST_FILE)
    return Cifar10(
        x_train=np.concatenate([x for x, _ in train]),
        y_train=np.concatenate([y for _, y in train]),
        x_test=x_test,
        y_test=y_test,
        source=str(folder),
    )


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds (dicts, lists, strings,
    numbers and NumPy arrays), so that a wrong file cannot run code."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def read_batch(path):
    """Reads one batch file: uint8 images `(N, 32, 32, 3)`, int32 labels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"missing file {path} (a CIFAR-10 folder holds "
            f"{', '.join(TRAIN_FILES)} and {TEST_FILE}); {HOW_TO_GET_IT}"
        )
    try:
        with open(path, "rb") as file:
            batch = _BatchUnpickler(file, encoding="bytes").load()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}") from None
    except Exception as error:  # any unpickling failure: a broken file
        raise DataError(
            f"{path} is truncated or not a CIFAR-10 python batch "
            f"({type(error).__name__}: {error})"
        ) from None
    if not isinstance(batch, dict):
        raise DataError(
            f"{path} is not a CIFAR-10 python batch (a {type(batch).__name__}, "
            f"not a dict)"
        )
    batch = {
        key.decode("latin1") if isinstance(key, bytes) else key: value
        for key, value in batch.items()
    }
    if "data" not in batch or "labels" not in batch:
        raise DataError(
            f"{path} is not a CIFAR-10 python batch (no 'data' and 'labels')"
        )
    data = batch["data"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 32 * 32 * 3
        or data.shape[0] == 0
    ):
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(
            f"{path}: 'data' has shape {shape} and type {dtype}; expected an "
            f"(N, 3072) uint8 array with N > 0"
        )
    try:
        labels = np.asarray(batch["labels"])
    except Exception:  # ragged or odd objects
        labels = np.asarray([], dtype=object)
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise DataError(
            f"{path}: 'labels' has shape {labels.shape} and type "
            f"{labels.dtype}; expected {len(data)} integers, one per image"
        )
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise DataError(
            f"{path}: labels range over {labels.min()}..{labels.max()}; "
            f"expected 0..{len(CLASSES) - 1}"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def download():
    """CIFAR-10 through `keras.datasets.cifar10` (downloads once, then cached)."""
    try:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as error:  # offline, or a failed or partial download
        reason = " ".join(str(error).split()) or type(error).__name__
        raise DataError(
            "CIFAR-10 not found: no --data-dir was given, CIFAR10_DIR is not "
            f"set, and Keras could not download it ({reason[:200]}); "
            f"{HOW_TO_GET_IT}"
        ) from None
    if x_train.shape[1:] == (3, 32, 32):  # channels_first Keras config
        x_train = x_train.transpose(0, 2, 3, 1)
        x_test = x_test.transpose(0, 2, 3, 1)
    return Cifar10(
        x_train=np.ascontiguousarray(x_train),
        y_train=y_train.reshape(-1).astype(np.int32),
        x_test=np.ascontiguousarray(x_test),
        y_test=y_test.reshape(-1).astype(np.int32),
        source="keras.datasets.cifar10 (~/.keras/datasets)",
    )


# --------------------------------------------------------------------- subsets


def stratified_subset(labels, size, seed=0):
    """Indices (sorted) of `size` examples with the classes as balanced as
    possible: `size // 10` of each class, one more for `size % 10` classes
    chosen at random; the examples of each class are drawn at random.

    Raises:
        DataError: if a class has too few examples.
    """
    labels = np.asarray(labels)
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
                f"only {len(members)} (need {count})"
            )
        chosen.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(chosen))


# ---------------------------------------------------------------- normalization


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
    return (
        np.asarray(mean, np.float32),
        np.maximum(np.asarray(std, np.float32), 1e-3),
    )


def normalize(images, mean, std):
    """uint8 images -> float32, scaled to [0, 1], then `(x - mean) / std` per
    channel."""
    scale = (1.0 / (255.0 * np.asarray(std))).astype(np.float32)
    offset = (-np.asarray(mean) / np.asarray(std)).astype(np.float32)
    return images.astype(np.float32) * scale + offset


# ----------------------------------------------------------------- augmentation


def augment(images, rng, pad=4):
    """The standard CIFAR augmentation of uint8 images `(N, H, W, C)`: zero
    (black) padding by `pad` pixels, a random HxW crop, and a horizontal flip
    with probability 1/2, drawn independently per image from `rng`. One
    gather, so cheap next to a training step."""
    n, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    top = rng.integers(0, 2 * pad + 1, n)
    left = rng.integers(0, 2 * pad + 1, n)
    flip = rng.random(n) < 0.5
    rows = top[:, None] + np.arange(height)
    cols = left[:, None] + np.arange(width)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


# ---------------------------------------------------------------------- batches


def num_batches(size, batch_size):
    return -(-size // batch_size)


def epoch_rng(seed, epoch):
    """The random generator of one epoch: the same for the same (seed, epoch),
    so shuffling and augmentation repeat, also after a resume."""
    return np.random.default_rng([seed, epoch])


def train_batches(images, labels, batch_size, mean, std, rng, augmented=False):
    """One epoch of normalized training batches `(x float32, y int32)` in the
    random order of `rng` (the last one smaller where the size does not
    divide), augmented with `rng` if `augmented`."""
    order = rng.permutation(len(images))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        x = images[index]
        if augmented:
            x = augment(x, rng)
        yield normalize(x, mean, std), labels[index]
