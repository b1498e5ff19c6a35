"""CIFAR-10, read and checked: a missing, truncated or wrong file raises
`DataError`, one line naming it."""

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiment.startup import quiet_startup

NUM_CLASSES = 10
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
FOLDER = "cifar-10-batches-py"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
HOW_TO_GET_IT = (
    f"download {URL}, extract it (tar xzf cifar-10-python.tar.gz) and pass "
    f"--data-dir /path/to/{FOLDER} or set CIFAR10_DIR to that folder")


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


def load(data_dir=None):
    """The official python layout in `data_dir`, else `$CIFAR10_DIR` (or
    their `cifar-10-batches-py`), else `download`."""
    origin = "--data-dir"
    if data_dir is None and os.environ.get("CIFAR10_DIR"):
        data_dir, origin = os.environ["CIFAR10_DIR"], "CIFAR10_DIR"
    if data_dir is None:
        return download()
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"CIFAR-10 folder {str(folder)!r} (from {origin}) does not exist "
            f"or is not a folder; {HOW_TO_GET_IT}")
    if not (folder / TEST_FILE).exists() and (folder / FOLDER).is_dir():
        folder = folder / FOLDER
    train = [read_batch(folder / name) for name in TRAIN_FILES]
    x_test, y_test = read_batch(folder / TEST_FILE)
    return Cifar10(np.concatenate([x for x, _ in train]),
                   np.concatenate([y for _, y in train]), x_test, y_test,
                   source=str(folder))


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: a file cannot run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
    ALLOWED |= {(f"numpy.{core}.{module}", name)
                for core in ("core", "_core")
                for module, name in (("multiarray", "_reconstruct"),
                                     ("multiarray", "scalar"),
                                     ("numeric", "_frombuffer"))}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def read_batch(path):
    """A pickled dict of `data` (`(N, 3072)` uint8, channel-major RGB) and
    `labels` (N in 0..9) -> uint8 images `(N, 32, 32, 3)`, int32 labels."""
    data, labels = _unpickle(path)
    if (getattr(data, "dtype", None) != np.uint8
            or data.shape[1:] != (32 * 32 * 3,) or not len(data)):
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(
            f"{path}: 'data' has shape {getattr(data, 'shape', None)} and type "
            f"{dtype}; expected an (N, 3072) uint8 array with N > 0")
    try:
        labels = np.asarray(labels)
    except Exception:  # ragged or odd objects
        labels = np.asarray([], dtype=object)
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise DataError(
            f"{path}: 'labels' has shape {labels.shape} and type "
            f"{labels.dtype}; expected {len(data)} integers, one per image")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(
            f"{path}: labels range over {labels.min()}..{labels.max()}; "
            f"expected 0..{NUM_CLASSES - 1}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def _unpickle(path):
    if not path.is_file():
        raise DataError(
            f"missing file {path} (a CIFAR-10 folder holds "
            f"{', '.join(TRAIN_FILES)} and {TEST_FILE}); {HOW_TO_GET_IT}")
    try:
        with open(path, "rb") as file:
            batch = _BatchUnpickler(file, encoding="bytes").load()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}") from None
    except Exception as error:  # any unpickling failure: a broken file
        raise DataError(
            f"{path} is truncated or not a CIFAR-10 python batch "
            f"({type(error).__name__}: {error})") from None
    if not isinstance(batch, dict):
        raise DataError(
            f"{path} is not a CIFAR-10 python batch (a {type(batch).__name__}, "
            f"not a dict)")
    batch = {key.decode("latin1") if isinstance(key, bytes) else key: value
             for key, value in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(
            f"{path} is not a CIFAR-10 python batch (no 'data' and 'labels')")
    return batch["data"], batch["labels"]


def download():
    """CIFAR-10 through `keras.datasets.cifar10` (downloaded once, cached)."""
    try:
        with quiet_startup():  # TensorFlow's start-up lines hidden
            import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as error:  # offline, or a failed or partial download
        reason = " ".join(str(error).split()) or type(error).__name__
        raise DataError(
            "CIFAR-10 not found: no --data-dir was given, CIFAR10_DIR is not "
            f"set, and Keras could not download it ({reason[:200]}); "
            f"{HOW_TO_GET_IT}") from None
    if x_train.shape[1:] == (3, 32, 32):  # channels_first Keras config
        x_train, x_test = (x.transpose(0, 2, 3, 1) for x in (x_train, x_test))
    x_train, x_test = (np.ascontiguousarray(x) for x in (x_train, x_test))
    y_train, y_test = (y.reshape(-1).astype(np.int32)
                       for y in (y_train, y_test))
    return Cifar10(x_train, y_train, x_test, y_test,
                   source="keras.datasets.cifar10 (~/.keras/datasets)")
