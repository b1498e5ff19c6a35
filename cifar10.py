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
    return crop(images, *crop_offsets(len(images), rng, pad), pad=pad)


def crop_offsets(n, rng, pad=4):
    """What `augment` draws from `rng` for `n` images, in this order: the top
    and left offsets of each crop in the padded image (0..2 * pad) and whether
    it is flipped. Drawn apart from the pixels so that device_data.py can make
    the same crops on the accelerator."""
    top = rng.integers(0, 2 * pad + 1, n)
    left = rng.integers(0, 2 * pad + 1, n)
    flip = rng.random(n) < 0.5
    return top, left, flip


def crop(images, top, left, flip, pad=4):
    """The crops of `crop_offsets` from uint8 images `(N, H, W, C)` padded
    with `pad` zeros on each side, mirrored where `flip`."""
    n, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
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


def steps_per_epoch(labels, batch_size, classes_per_batch=None):
    """The number of batches `train_batches` yields in one epoch (any rng)."""
    if classes_per_batch:
        return num_class_batches(labels, batch_size, classes_per_batch)
    return num_batches(len(labels), batch_size)


def train_batches(images, labels, batch_size, mean, std, rng, augmented=False,
                  classes_per_batch=None):
    """One epoch of normalized training batches `(x float32, y int32)`,
    augmented with `rng` if `augmented`.

    i.i.d. (`classes_per_batch` None): the examples in the random order of
    `rng`, cut into batches of `batch_size` (the last one smaller where the
    size does not divide). Non-i.i.d. (`classes_per_batch` K): the batches of
    `class_batches`, each from exactly K classes."""
    for index, offsets in batch_plan(labels, batch_size, rng, augmented,
                                     classes_per_batch):
        x = images[index]
        if offsets is not None:
            x = crop(x, *offsets)
        yield normalize(x, mean, std), labels[index]


def batch_plan(labels, batch_size, rng, augmented=False,
               classes_per_batch=None):
    """Everything random in an epoch of `train_batches`, drawn from `rng` in
    the same order: for each batch, the indices of its examples and, if
    `augmented`, their `crop_offsets` (else None). Both the host batches and
    the device batches (device_data.py) are made from it, so they agree."""
    if classes_per_batch:
        batches = class_batches(labels, batch_size, classes_per_batch, rng)
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
