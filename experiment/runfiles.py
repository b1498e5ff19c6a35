"""A run's files, and the one way each is written and read.

A run NAME has HISTORY_DIR/NAME.csv (a row per finished epoch, `columns`),
HISTORY_DIR/NAME.json (its configuration, environment and result),
WEIGHTS_DIR/NAME.weights.h5 and NAME.best.weights.h5 (the last and the best
weights) and WEIGHTS_DIR/NAME.state.npz (what --resume continues from).
Every file is replaced atomically (`atomic_path`), but for the CSV, to which
a row is appended and flushed to disk as an epoch ends. `replace_block`
fills a generated block of a text file such as README.md.
"""

import csv
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiment.cli import UsageError

PROG = "train.py"


@dataclass
class Paths:
    csv: Path
    json: Path
    last: Path
    best: Path
    state: Path

    @classmethod
    def of(cls, name, history_dir, weights_dir):
        return cls(
            csv=history_dir / f"{name}.csv",
            json=history_dir / f"{name}.json",
            last=weights_dir / f"{name}.weights.h5",
            best=weights_dir / f"{name}.best.weights.h5",
            state=weights_dir / f"{name}.state.npz",
        )

    def all(self):
        return (self.csv, self.json, self.last, self.best, self.state)


def writable_dir(path, what):
    """Creates `path` if needed and checks that a file can be written there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".{PROG}.{os.getpid()}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(
            f"cannot write to the {what} {str(path)!r}: "
            f"{error.strerror or error}"
        ) from None


@contextmanager
def atomic_path(path):
    """A temporary path beside `path` (same suffixes) that replaces `path`
    when the block ends without error, after being flushed to disk."""
    suffixes = "".join(path.suffixes)  # Keras wants .weights.h5
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffixes}")
    try:
        yield temporary
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json(path, data):
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n")


def columns(config):
    names = ["epoch", "seconds", "eval_seconds", "loss", "accuracy",
             "val_loss", "val_accuracy", "lr"]
    return names + (["r_max", "d_max"] if config["norm"] == "renorm" else [])


def write_rows(path, header, rows):
    """Replaces the CSV with `rows`, atomically."""
    with atomic_path(path) as temporary:
        with open(temporary, "w", newline="") as file:
            writer = csv.DictWriter(file, header, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


def append_row(path, header, row):
    with open(path, "a", newline="") as file:
        csv.DictWriter(file, header, extrasaction="ignore").writerow(row)
        file.flush()
        os.fsync(file.fileno())


def read_csv(path):
    """The header and the non-blank rows of a CSV file, each row with the
    line number it ends on: `(header, [(line, fields), ...])`; `([], [])`
    for an empty file. Raises what reading raises (OSError,
    UnicodeDecodeError, csv.Error)."""
    with open(path, newline="") as file:
        reader = csv.reader(file)
        rows = [(reader.line_num, row) for row in reader if row]
    if not rows:
        return [], []
    return rows[0][1], rows[1:]


def read_rows(path):
    """The rows of a history CSV that name their epoch, as dicts by column
    (as csv.DictReader gives them); none for a missing file."""
    try:
        header, rows = read_csv(path)
    except FileNotFoundError:
        return []
    found = []
    for _, fields in rows:
        row = dict(zip(header, fields))
        row.update({column: None for column in header[len(fields):]})
        if len(fields) > len(header):
            row[None] = fields[len(header):]
        if row.get("epoch"):
            found.append(row)
    return found


def save_state(model, path, meta):
    """Model variables, optimizer variables and `meta`, in one .npz."""
    arrays = {"meta": np.array(json.dumps(meta))}
    for prefix, variables in (("model", model.variables),
                              ("optimizer", model.optimizer.variables)):
        for i, variable in enumerate(variables):
            arrays[f"{prefix}/{i:04d}"] = np.asarray(variable.numpy())
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as file:
            np.savez(file, **arrays)


def load_state(model, path):
    """Restores what `save_state` saved; returns its `meta`."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {key: saved[key] for key in saved.files}
        meta = json.loads(str(arrays.pop("meta")))
    except Exception as error:
        raise RuntimeError(f"cannot read {path} ({error})") from None
    if not model.optimizer.built:  # build() twice adds variables
        model.optimizer.build(model.trainable_variables)
    for prefix, variables in (("model", model.variables),
                              ("optimizer", model.optimizer.variables)):
        keys = sorted(k for k in arrays if k.startswith(prefix + "/"))
        shapes = [tuple(arrays[k].shape) for k in keys]
        if shapes != [tuple(v.shape) for v in variables]:
            raise RuntimeError(
                f"{path} does not fit this model and optimizer ({prefix} "
                f"variables differ); was the run's configuration changed?"
            )
        for key, variable in zip(keys, variables):
            variable.assign(arrays[key])
    return meta


def save_weights(model, path):
    with atomic_path(path) as temporary:
        model.save_weights(temporary)


def read_json(path):
    """A JSON file's content; RuntimeError where it is not JSON (or not
    text)."""
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise RuntimeError(f"{path} is unreadable ({error})") from None


def replace_block(path, begin, end, body):
    """Replaces the text of `path` between the lines `begin` and `end` with
    `body`, atomically.

    Raises:
        ValueError: `path` has no such block.
    """
    text = path.read_text()
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"{path} has no {begin} ... {end} block to fill")
    updated = text[:start + len(begin)] + "\n" + body + text[stop:]
    with atomic_path(path) as temporary:
        temporary.write_text(updated)
