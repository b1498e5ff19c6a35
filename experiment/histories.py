"""train.py's histories (docs/experiment.md) as runs and groups of seeds."""

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from experiment import runfiles
from experiment.protocols import CONFIG_KEYS, SCHEDULE_STEPS
from models import NORMS

COLUMNS = ("epoch", "seconds", "loss", "accuracy", "val_loss", "val_accuracy")
TRAIN_MODE_COLUMNS = ("val_loss_train_mode", "val_accuracy_train_mode")
# val_accuracy - val_accuracy_train_mode, where a run has the latter.
GAP = "train_inference_gap"
CORRECTIONS_SUFFIX = ".corrections"  # NAME.corrections.csv
ENVIRONMENT_KEYS = ("device", "backend")
# Labels name these first, in this order; the other keys follow.
LABEL_ORDER = ("protocol", "batch_size", "classes_per_batch",
               "virtual_batch_size", "sampling", "epochs", "lr",
               "train_size", "depth", "width", "augment")
# The keys that split runs into groups, in label order (seeds: repeats).
GROUP_FIELDS = tuple(key for key in dict.fromkeys(
    LABEL_ORDER + CONFIG_KEYS + ENVIRONMENT_KEYS)
    if key not in ("norm", "seed", "name"))
# The settings a norm does not use: they neither split nor name its groups.
RENORM_ONLY = (*SCHEDULE_STEPS, "renorm_schedule", "track_corrections")
IGNORED_BY = {"batchnorm": ("r_max", "d_max", *RENORM_ONLY),
              "keras-renorm": RENORM_ONLY}
IGNORED = "(not used)"  # the value of such a setting


class BadHistory(Exception):
    """A history that cannot be used (the message says why)."""


@dataclass
class Run:
    name: str
    path: Path
    config: dict
    frame: pd.DataFrame  # the COLUMNS (and GAP), one row per epoch
    corrections: pd.DataFrame | None = None  # a row per epoch and layer

    def warmup_epoch(self):
        """Where a renorm run's bounds start to relax, in epochs, or None."""
        steps = self.config["warmup_steps"]
        per_epoch = self.config.get("steps_per_epoch")
        if (self.config["norm"] == "renorm" and is_number(per_epoch)
                and is_number(steps) and min(per_epoch, steps) > 0):
            return steps / per_epoch
        return None

    def value(self, field):
        """The setting `field`, hashable; IGNORED where the norm has none."""
        if field in IGNORED_BY.get(self.config["norm"], ()):
            return IGNORED
        value = self.config.get(field)
        return (json.dumps(value, sort_keys=True)
                if isinstance(value, (list, tuple, dict)) else value)


@dataclass
class Group:
    norm: str
    key: tuple  # ((field, value), ...) of the fields that split the runs
    runs: list

    @property
    def label(self):
        return settings_text(self.key, self.norm)

    def key_for(self, norm):
        """The key less the settings that `norm` does not use."""
        return tuple((f, v) for f, v in self.key
                     if f not in IGNORED_BY.get(norm, ()))


def sampling_text(classes):
    """How a run's batches were drawn, from its classes_per_batch."""
    return "i.i.d." if classes is None else f"{classes} classes/batch"


def settings_text(pairs, *first):
    """`first`, then the (field, value) pairs a norm uses, in words."""
    return ", ".join([*first, *(field_text(f, v) for f, v in pairs
                                if v != IGNORED)])


def field_text(field, value):
    if field == "classes_per_batch":
        return sampling_text(value)
    if field == "virtual_batch_size":
        return "whole batch" if value is None else f"virtual batch {value}"
    if field == "sampling":
        return "i.i.d." if value == "iid" else f"sampling {value}"
    return f"{field}={value}"


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sort_key(value):
    """None, then numbers, then the rest as text."""
    return ((0, 0, "") if value is None else (1, value, "")
            if is_number(value) else (2, 0, str(value)))


def group_size(config):
    """V: the examples of a run's normalization statistics."""
    return config["virtual_batch_size"] or config["batch_size"]


def norm_rank(norm):
    return (NORMS.index(norm), "") if norm in NORMS else (len(NORMS), norm)


def test_result(run, key="test_accuracy"):
    """A run's `result[key]` (in [0, 1]), None where it has none."""
    result = run.config.get("result")
    value = result.get(key) if isinstance(result, dict) else None
    return value if is_number(value) else None


def warn(message):
    print(f"plot.py: warning: {message}", file=sys.stderr)


def history_paths(runs, history_dir):
    """The .csv path of each named run, or of every run in `history_dir`."""
    if not runs:
        runs = sorted((p for p in history_dir.glob("*") if p.is_file()
                       and p.suffix in (".csv", ".json")
                       and not is_corrections(p)), key=lambda p: p.stem)
    return list(dict.fromkeys(
        history_csv(Path(run)) if Path(run).suffix in (".csv", ".json")
        else history_dir / f"{run}.csv" for run in runs))


def is_corrections(path):
    """Whether `path` is a NAME.corrections.csv (no .json of its own)."""
    return (path.suffix == ".csv" and path.stem.endswith(CORRECTIONS_SUFFIX)
            and not path.with_suffix(".json").is_file())


def history_csv(path):
    """The CSV of a run named by its .csv, .json or .corrections.csv."""
    if is_corrections(path):
        return path.with_name(path.stem[:-len(CORRECTIONS_SUFFIX)] + ".csv")
    return path.with_suffix(".csv")


def read_config(path):
    if not path.is_file():
        raise BadHistory(f"no configuration file {path.name}")
    try:
        config = runfiles.read_json(path)
    except (OSError, RuntimeError) as error:
        raise BadHistory(str(error)) from None
    if not isinstance(config, dict) or not isinstance(config.get("norm"), str):
        raise BadHistory(f"{path.name} names no norm")
    missing = [key for key in CONFIG_KEYS + ENVIRONMENT_KEYS
               if key not in config]
    if missing:
        raise BadHistory(f"{path.name} lacks the key(s) {', '.join(missing)}")
    return config


def read_table(path, required, numeric, finite, optional=()):
    """A CSV's `numeric` and present `optional` columns, the rest of
    `required` as text; a bad row (fields, a non-number, a non-finite
    `finite`, empty text) is fatal but the last (still written): warned."""
    if not path.is_file():
        raise BadHistory("no CSV file")
    try:
        header, rows = runfiles.read_csv(path)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise BadHistory(f"unreadable CSV ({error})") from None
    if not header:
        raise BadHistory("empty CSV")
    missing = [column for column in required if column not in header]
    if missing:
        raise BadHistory(f"missing column(s) {', '.join(missing)}")
    if len(set(header)) < len(header):
        raise BadHistory("repeated column names")
    width = len(header)
    text = pd.DataFrame([row[:width] + [""] * (width - len(row))
                         for _, row in rows], columns=header, dtype=str)
    numbers = text[list(numeric) + [c for c in optional if c in header]]
    frame = numbers.apply(pd.to_numeric, errors="coerce").astype(float)
    allowed = numbers.apply(lambda col: col.str.strip().str.lower().isin(
        ("nan", "") if col.name in optional else ("nan",)))
    words = [c for c in required if c not in numeric]
    bad = (pd.Series([len(row) != width for _, row in rows], dtype=bool)
           | (frame.isna() & ~allowed).any(axis=1)
           | ~np.isfinite(frame[list(finite)]).all(axis=1)
           | (text[words].map(str.strip) == "").any(axis=1))
    bad_lines = [line for (line, _), is_bad in zip(rows, bad) if is_bad]
    keep = len(rows)
    if keep > 1 and bad_lines == [rows[-1][0]] and len(rows[-1][1]) <= width:
        warn(f"{path}: dropped incomplete last row (line {bad_lines[0]})")
        keep -= 1
    elif bad_lines:
        raise BadHistory("wrong number of fields, missing or non-numeric "
                         "values on line(s) "
                         + ", ".join(map(str, bad_lines[:5])))
    if not keep:
        raise BadHistory("no complete epoch")
    for column in words:
        frame[column] = text[column].str.strip()
    return frame[[c for c in header if c in frame]].iloc[:keep]


def read_frame(path):
    """A history CSV (the GAP where it can); an epoch's latest row."""
    frame = read_table(path, COLUMNS, COLUMNS, ("epoch", "seconds"),
                       TRAIN_MODE_COLUMNS)
    if "val_accuracy_train_mode" in frame:
        frame[GAP] = frame["val_accuracy"] - frame["val_accuracy_train_mode"]
    frame = frame.drop_duplicates("epoch", keep="last").sort_values("epoch")
    return frame.reset_index(drop=True)


def read_corrections(path):
    """A NAME.corrections.csv: the latest row per epoch and layer."""
    columns = runfiles.CORRECTION_COLUMNS
    frame = read_table(path, columns, [c for c in columns if c != "layer"],
                       ("epoch",))[list(columns)]
    order = {layer: n for n, layer in enumerate(frame["layer"].unique())}
    frame = frame.drop_duplicates(["epoch", "layer"], keep="last")
    frame = frame.sort_values(["epoch", "layer"],
                              key=lambda c: c.map(order) if c.name == "layer"
                              else c, kind="stable")
    return frame.reset_index(drop=True)


def load_runs(paths):
    """The usable runs among `paths` (a warning for each other)."""
    runs = []
    for path in paths:
        try:
            frame = read_frame(path)
            runs.append(Run(path.stem, path,
                            read_config(path.with_suffix(".json")), frame))
        except BadHistory as error:
            warn(f"skipping {path}: {error}")
            continue
        corrections = path.with_name(f"{path.stem}{CORRECTIONS_SUFFIX}.csv")
        if corrections.is_file():
            try:
                runs[-1].corrections = read_corrections(corrections)
            except BadHistory as error:
                warn(f"skipping the corrections {corrections}: {error}")
    return runs


def splitting_fields(runs):
    """GROUP_FIELDS that split the runs further than those before them."""
    kept = []
    for field in GROUP_FIELDS:
        using = [run for run in runs if run.value(field) != IGNORED]
        before = {tuple(run.value(f) for f in kept) for run in using}
        after = {tuple(run.value(f) for f in kept + [field]) for run in using}
        if len(after) > len(before):
            kept.append(field)
    return kept


def group_runs(runs):
    """Groups of runs equal in every GROUP_FIELDS key, by norm and key."""
    fields = splitting_fields(runs)
    groups = {}
    for run in sorted(runs, key=lambda r: r.name):
        norm = run.config["norm"]
        every = (norm, tuple(run.value(f) for f in GROUP_FIELDS))
        key = tuple((f, run.value(f)) for f in fields)
        groups.setdefault(every, Group(norm, key, [])).runs.append(run)
    return sorted(groups.values(), key=lambda g: (
        norm_rank(g.norm), [sort_key(v) for _, v in g.key]))


@dataclass
class Point:
    """The runs of one norm, sampling, rest (other splitting fields) and x."""

    norm: str
    sampling: object
    rest: tuple
    x: object
    runs: list

    @property
    def line(self):
        return (self.norm, self.sampling, self.rest)


def points(runs, make, coordinates, order):
    """A `make` (Point) per norm, coordinates(run) (sampling, x) and rest."""
    rest_fields = [f for f in splitting_fields(runs) if f not in make.FIELDS]
    found = {}
    for run in sorted(runs, key=lambda r: r.name):
        rest = tuple((f, run.value(f)) for f in rest_fields)
        sampling, x = coordinates(run)
        key = (run.config["norm"], sampling, rest, x)
        found.setdefault(key, make(*key, []))
        found[key].runs.append(run)
    return sorted(found.values(), key=order)


def lines(points):
    """{(norm, sampling, rest): {x: point}}, in the points' order."""
    found = {}
    for point in points:
        found.setdefault(point.line, {})[point.x] = point
    return found


def x_values(points):
    return sorted({p.x for p in points}, key=sort_key)
