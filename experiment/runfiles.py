"""A run's files (docs/experiment.md, "Files of a run") and the one way each
is written (atomically, but the CSV's appended rows) and read."""

import csv
import errno
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiment.cli import UsageError


@dataclass
class Paths:
    """A run's files, by what each holds."""

    csv: Path
    json: Path
    corrections: Path
    last: Path
    best: Path
    state: Path

    @classmethod
    def of(cls, name, history_dir, weights_dir):
        return cls(*(history_dir / f"{name}{suffix}" for suffix in (
            ".csv", ".json", ".corrections.csv")), *(
                weights_dir / f"{name}{suffix}" for suffix in (
                    ".weights.h5", ".best.weights.h5", ".state.npz")))

    @property
    def lock(self):
        return self.csv.with_suffix(".lock")

    def all(self):
        return tuple(vars(self).values())


def writable_dir(path, what):
    """Creates `path` if needed and checks that a file can be written there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".train.py.{os.getpid()}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"cannot write to the {what} {str(path)!r}: "
                         f"{error.strerror or error}") from None


class WriteError(RuntimeError):
    """A run's file could not be written (the earlier one is intact)."""


def remove_temporaries(paths):
    """Removes (and returns) what killed writers of these paths left."""
    removed = [temporary for path in paths
               for temporary in path.parent.glob(f".{path.name}.*.tmp*")]
    for temporary in removed:
        temporary.unlink(missing_ok=True)
    return removed


def write_file(path, data, append=False):
    """Replaces `path` with `data` (written beside it, flushed, renamed), or
    appends it, flushed; a one-line WriteError where that fails or the disk
    is full (a replaced `path` is then untouched)."""
    temporary = path if append else path.with_name(
        f".{path.name}.{os.getpid()}.tmp{''.join(path.suffixes)}")
    try:
        if shutil.disk_usage(path.parent).free < len(data):
            raise OSError(errno.ENOSPC, "no room")
        with open(temporary, "ab" if append else "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if not append:
            os.replace(temporary, path)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise WriteError(f"cannot write {path}: "
                             f"{error.strerror or error}") from None
        free = shutil.disk_usage(path.parent).free
        raise WriteError(
            f"cannot write {path}: not enough free space ({len(data) / 1e6:.2f}"
            f" MB needed, {free / 1e6:.2f} MB free in {path.parent})") from None
    finally:
        if not append:
            temporary.unlink(missing_ok=True)


def write_json(path, data):
    write_file(path, (json.dumps(data, indent=2) + "\n").encode())


def columns(config):
    train_mode = ["val_loss_train_mode", "val_accuracy_train_mode"]
    bounds = ["r_max", "d_max"]
    return (["epoch", "seconds", "eval_seconds", "loss", "accuracy",
             "val_loss", "val_accuracy"]
            + (train_mode if config.get("train_mode_validation") else [])
            + ["lr"] + (bounds if config["norm"] == "renorm" else []))


CORRECTION_COLUMNS = ("epoch", "layer", "r_dev", "d_dev", "r_clipped",
                      "d_clipped", "r_max", "d_max")


def csv_text(header, rows, with_header=True):
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, header, extrasaction="ignore")
    if with_header:
        writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def write_rows(path, header, rows):
    write_file(path, csv_text(header, rows).encode())


def append_row(path, header, row):
    """Appends a row, flushed (the state, written first, has it too)."""
    data = csv_text(header, [row], with_header=False).encode()
    write_file(path, data, append=True)


def read_csv(path):
    """`(header, [(line, fields), ...])`: the non-blank rows, each with the
    line it ends on; `([], [])` for an empty file."""
    with open(path, newline="") as file:
        reader = csv.reader(file)
        rows = [(reader.line_num, row) for row in reader if row]
    return (rows[0][1], rows[1:]) if rows else ([], [])


def read_rows(path):
    """A history CSV's rows that name their epoch ([] if it is missing)."""
    try:
        with open(path, newline="") as file:
            return [row for row in csv.DictReader(file) if row.get("epoch")]
    except FileNotFoundError:
        return []


def resumed_rows(path, header, meta):
    """--resume: writes the state's rows to the CSV again; returns them and
    a note of what the CSV held where it differed (else None)."""
    note = None
    try:
        with open(path, newline="") as file:
            found = list(csv.DictReader(file))
    except FileNotFoundError:
        note = f"repaired {path} from the saved state: it was missing"
    except (UnicodeDecodeError, csv.Error) as error:
        note = f"moved the unreadable {path} ({error}) to {set_aside(path)}"
    else:
        epochs = [row for row in found if row.get("epoch")]
        unnumbered = len(found) - len(epochs)
        if unnumbered or any(None in row for row in epochs) or csv_text(
                header, epochs) != csv_text(header, meta["rows"]):
            incomplete = sum(None in row or any(
                row.get(c) in (None, "") for c in header) for row in epochs)
            note = (f"repaired {path} from the saved state: it held epochs "
                    + (",".join(row["epoch"] for row in epochs) or "none")
                    + (f" ({incomplete} of its rows incomplete)"
                       if incomplete else "")
                    + (f" and {unnumbered} row(s) without an epoch"
                       if unnumbered else ""))
    write_rows(path, header, meta["rows"])
    if note:
        note += f"; it now holds epochs 1-{meta['epoch']}"
    return meta["rows"], note


def set_aside(path):
    """Renames `path` to PATH.unreadable[.N], never over an earlier one."""
    aside, number = path.with_name(path.name + ".unreadable"), 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.unreadable.{number}")
        number += 1
    os.replace(path, aside)
    return aside


def finished(history_dir, name, epochs):
    """Whether run `name` has `epochs` epochs (or more) and its result."""
    try:
        record = read_json(history_dir / f"{name}.json")
    except (OSError, RuntimeError):
        return False
    return (isinstance(record, dict) and "result" in record
            and len(read_rows(history_dir / f"{name}.csv")) >= epochs)


def state_variables(model):
    return (("model", model.variables),
            ("optimizer", model.optimizer.variables))


def save_state(model, path, meta):
    """Model variables, optimizer variables and `meta`, in one .npz."""
    arrays = {f"{prefix}/{i:04d}": np.asarray(variable.numpy())
              for prefix, variables in state_variables(model)
              for i, variable in enumerate(variables)}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
    write_file(path, buffer.getvalue())


def read_state(path, meta_only=False):
    try:
        with np.load(path, allow_pickle=False) as saved:
            meta = json.loads(str(saved["meta"]))
            arrays = {} if meta_only else {
                key: saved[key] for key in saved.files if key != "meta"}
    except Exception as error:
        raise RuntimeError(f"cannot read {path} ({error})") from None
    return meta, arrays


def saved_epoch(path):
    return read_state(path, meta_only=True)[0]["epoch"]


def load_state(model, path):
    """Restores what `save_state` saved; returns its `meta`."""
    meta, arrays = read_state(path)
    if not model.optimizer.built:  # build() twice adds variables
        model.optimizer.build(model.trainable_variables)
    for prefix, variables in state_variables(model):
        keys = sorted(k for k in arrays if k.startswith(prefix + "/"))
        shapes = [tuple(arrays[k].shape) for k in keys]
        if shapes != [tuple(v.shape) for v in variables]:
            raise RuntimeError(
                f"{path} does not fit this model and optimizer ({prefix} "
                f"variables differ); was the run's configuration changed?")
        for key, variable in zip(keys, variables):
            variable.assign(arrays[key])
    return meta


def save_weights(model, path, write=True):
    """`model.save_weights`'s file, made in memory by every process (saving
    joins collectives), written by `write_file` (a full disk: a WriteError)."""
    from keras.src.saving import saving_lib

    buffer = io.BytesIO()
    store = saving_lib.H5IOStore(buffer, mode="w")
    saving_lib._save_state(model, weights_store=store, assets_store=None,
                           inner_path="", visited_saveables=set())
    store.close()
    if write:
        write_file(path, buffer.getvalue())


def read_json(path):
    """A JSON file's content; RuntimeError where it is not JSON."""
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise RuntimeError(f"{path} is unreadable ({error})") from None


def replace_block(path, begin, end, body):
    """Replaces the text between `begin` and `end` (ValueError if none)."""
    text = path.read_text()
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"{path} has no {begin} ... {end} block to fill")
    start += len(begin)
    write_file(path, f"{text[:start]}\n{body}{text[stop:]}".encode())
