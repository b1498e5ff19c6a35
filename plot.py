#!/usr/bin/env python3
"""Plot and tabulate the training histories written by train.py.

Each run is a pair `<run>.csv` (one row per epoch: epoch, seconds, loss,
accuracy, val_loss, val_accuracy, ...) and `<run>.json` (its configuration).
Runs are grouped by normalization and by every other setting (each
configuration key, the backend and device, the precision, where validation
images come from, ...; a key an older history lacks counts as its legacy
value); runs that differ only in their seed (and name, timings, provenance)
are repeats of one group. Labels name the settings that tell groups apart.
Writes:

  PLOTS/curves.png             train/val loss and accuracy against epoch, a
                               colour per norm; with many groups a row of
                               panels per batch size (or whichever setting
                               splits them most); a dotted line where
                               renorm's warm-up ends
  PLOTS/seconds_per_epoch.png  a bar per group: median training s/epoch,
                               every epoch a dot, the ratio to batchnorm
  PLOTS/timing.md              per group: test accuracy (last weights, and
                               best-val weights where recorded), best and
                               final val accuracy, median s/epoch, ratio to
                               batchnorm, the code the runs ran (also
                               printed)
and, where the runs span several batch sizes or include non-i.i.d. ones
(train.py --classes-per-batch; sweep.py):
  PLOTS/accuracy_vs_batch_size.png  test (where recorded), best and final
                               val accuracy against batch size, a line per
                               norm (solid: i.i.d. batches, dashed: K
                               classes per batch)
  PLOTS/non_iid.png            i.i.d. against non-i.i.d. batches per batch
                               size and norm, and the accuracy lost
  tables in timing.md          test accuracy, then best / final val
                               accuracy, by norm, sampling and batch size

Figure titles state every setting that departs from the protocol the runs
name (and the full data set), and the device. A group whose runs come from
different commits, a dirty tree or code that recorded no provenance is
flagged on stderr and in timing.md.

With --readme FILE, the table also replaces what FILE holds between the
lines `<!-- timing.md begins -->` and `<!-- timing.md ends -->`, so that the
README's figures are the ones the histories give.

A partial or malformed history is skipped with a warning naming it.
"""

import argparse
import csv
import functools
import io
import json
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import (  # noqa: E402
    LogLocator, MaxNLocator, NullLocator, StrMethodFormatter)

from experiment import runfiles  # noqa: E402
from experiment.protocols import (  # noqa: E402 (NORMS fixes their colours)
    CONFIG_KEYS, LEGACY_DEFAULTS, NORMS, PROTOCOL_KEYS, PROTOCOLS,
    SCHEDULE_STEPS)

PROG = "plot.py"
COLUMNS = ("epoch", "seconds", "loss", "accuracy", "val_loss", "val_accuracy")
BASELINE = "batchnorm"
# Keys that newer histories record besides CONFIG_KEYS, and the environment's
# keys that split runs too.
NEW_KEYS = ("precision", "val_from", "val_size", "virtual_batch_size",
            "devices")
ENVIRONMENT_KEYS = ("device", "backend")
# The value that a history without one of NEW_KEYS had (beyond
# LEGACY_DEFAULTS; `precision` comes from `mixed_precision`): validation on a
# subset of the test set as in 2017, no virtual batches, one device.
PLOT_LEGACY = {"val_from": "test", "virtual_batch_size": None, "devices": 1}
# Labels name these first, in this order; the other keys follow.
LABEL_ORDER = ("protocol", "batch_size", "classes_per_batch", "epochs", "lr",
               "train_size", "depth", "width", "augment")
# Never split groups: the norm is a group's own; seeds are repeats; a name
# is a name; `mixed_precision` is contained in `precision` (derived from it).
NOT_GROUPED = ("norm", "seed", "name", "mixed_precision")
# Every key that splits runs into groups where they differ, in label order.
GROUP_FIELDS = tuple(key for key in dict.fromkeys(
    LABEL_ORDER + CONFIG_KEYS + NEW_KEYS + ENVIRONMENT_KEYS)
    if key not in NOT_GROUPED)
LINESTYLES = ("-", "--", ":", "-.")
README_BEGIN = "<!-- timing.md begins -->"
README_END = "<!-- timing.md ends -->"


class BadHistory(Exception):
    """A history that cannot be used; the message says why."""


@dataclass
class Run:
    name: str
    path: Path
    config: dict
    frame: pd.DataFrame  # the COLUMNS, numeric, one row per epoch

    @functools.cached_property
    def settings(self):
        """`config`, each key an older history lacks at its legacy value."""
        return settings(self.config)

    def value(self, field):
        """The run's setting `field` in a hashable form (None when absent)."""
        value = self.settings.get(field)
        if isinstance(value, (list, tuple, dict)):
            return json.dumps(value, sort_keys=True)
        return value


def settings(config):
    """A history's configuration, each key it lacks at its legacy value:
    `LEGACY_DEFAULTS`, `PLOT_LEGACY`, and `precision` from the older
    `mixed_precision` flag."""
    filled = {**PLOT_LEGACY, **LEGACY_DEFAULTS, **config}
    if "precision" not in config:
        filled["precision"] = ("mixed_float16" if config.get("mixed_precision")
                               else "float32")
    return filled


@dataclass
class Group:
    norm: str
    key: tuple  # ((field, value), ...) of the fields that split the runs
    runs: list

    @property
    def label(self):
        return ", ".join([self.norm] + [field_text(f, v) for f, v in self.key])


def sampling_text(classes):
    """How a run's batches were drawn, from its classes_per_batch."""
    return "i.i.d." if classes is None else f"{classes} classes/batch"


def field_text(field, value):
    if field == "classes_per_batch":
        return sampling_text(value)
    return f"{field}={value}"


def warn(message):
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "runs", nargs="*", metavar="RUN",
        help="runs to include: a name (file stem in --history-dir) or a path "
             "to its .csv; default: every history in --history-dir")
    parser.add_argument("--history-dir", type=Path, default=Path("history"),
                        help="where the histories are (default: %(default)s)")
    parser.add_argument("--plots-dir", type=Path, default=Path("plots"),
                        help="where to write the figures and timing.md "
                             "(default: %(default)s)")
    parser.add_argument("--readme", type=Path, metavar="FILE",
                        help="also put the table into FILE between the "
                             f"lines {README_BEGIN} and {README_END}")
    return parser.parse_args(argv)


def history_paths(runs, history_dir):
    """The .csv path of each named run, or of every run in `history_dir`."""
    if runs:
        paths = [Path(run).with_suffix(".csv")
                 if Path(run).suffix in (".csv", ".json")
                 else history_dir / f"{run}.csv" for run in runs]
    elif history_dir.is_dir():
        stems = {p.stem for p in history_dir.iterdir()
                 if p.suffix in (".csv", ".json") and p.is_file()}
        paths = [history_dir / f"{stem}.csv" for stem in sorted(stems)]
    else:
        paths = []
    return list(dict.fromkeys(paths))


def read_config(path):
    if not path.is_file():
        raise BadHistory(f"no configuration file {path.name}")
    try:
        config = runfiles.read_json(path)
    except (OSError, RuntimeError) as error:
        raise BadHistory(str(error)) from None
    if not isinstance(config, dict) or not isinstance(config.get("norm"), str):
        raise BadHistory(f"{path.name} names no norm")
    return config


def read_csv_rows(path):
    """The header and the non-blank rows of a CSV file, with the line number
    each row ends on."""
    if not path.is_file():
        raise BadHistory("no CSV file")
    try:
        header, rows = runfiles.read_csv(path)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise BadHistory(f"unreadable CSV ({error})") from None
    if not header:
        raise BadHistory("empty CSV")
    return header, rows


def read_frame(path):
    """The COLUMNS of a history CSV as numbers, one row per epoch. A bad last
    row (a run still writing it) is dropped with a warning; other bad rows
    (wrong number of fields, missing or non-numeric values) are fatal."""
    header, rows = read_csv_rows(path)
    missing = [column for column in COLUMNS if column not in header]
    if missing:
        raise BadHistory(f"missing column(s) {', '.join(missing)}")
    if len(set(header)) < len(header):
        raise BadHistory("repeated column names")
    width = len(header)
    text = pd.DataFrame([row[:width] + [""] * (width - len(row))
                         for _, row in rows], columns=header, dtype=str)
    text = text[list(COLUMNS)]
    frame = text.apply(pd.to_numeric, errors="coerce").astype(float)
    # "nan" is a legitimate metric of a diverged run; other non-numbers are not.
    nan_text = text.apply(lambda col: col.str.strip().str.lower() == "nan")
    wrong_width = pd.Series([len(r) != width for _, r in rows], dtype=bool)
    bad = (wrong_width | (frame.isna() & ~nan_text).any(axis=1)
           | ~np.isfinite(frame[["epoch", "seconds"]]).all(axis=1))
    bad_lines = [line for (line, _), is_bad in zip(rows, bad) if is_bad]
    last_line, last_row = rows[-1] if rows else (None, [])
    if len(rows) > 1 and bad_lines == [last_line] and len(last_row) <= width:
        warn(f"{path}: dropped incomplete last row (line {bad_lines[0]})")
        frame = frame.iloc[:-1]
    elif bad_lines:
        lines = ", ".join(map(str, bad_lines[:5]))
        raise BadHistory(f"wrong number of fields or non-numeric values on "
                         f"line(s) {lines}")
    if frame.empty:
        raise BadHistory("no complete epoch")
    # A resumed run may repeat epochs; its latest row for each counts.
    frame = frame.drop_duplicates("epoch", keep="last").sort_values("epoch")
    return frame.reset_index(drop=True)


def load_run(csv_path):
    frame = read_frame(csv_path)
    config = read_config(csv_path.with_suffix(".json"))
    return Run(csv_path.stem, csv_path, config, frame)


def load_runs(paths):
    """The usable runs among `paths`; each unusable one is named on stderr."""
    runs = []
    for path in paths:
        try:
            runs.append(load_run(path))
        except BadHistory as error:
            warn(f"skipping {path}: {error}")
    return runs


def splitting_fields(runs):
    """GROUP_FIELDS that differ between runs, each kept only if it splits the
    runs further than the fields kept before it (so a batch size that always
    goes with a protocol is not repeated in every label)."""
    kept = []
    for field in GROUP_FIELDS:
        before = {tuple(run.value(f) for f in kept) for run in runs}
        after = {tuple(run.value(f) for f in kept + [field]) for run in runs}
        if len(after) > len(before):
            kept.append(field)
    return kept


def sort_key(value):
    if value is None:
        return (0, 0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, value, "")
    return (2, 0, str(value))


def norm_rank(norm):
    return (NORMS.index(norm), "") if norm in NORMS else (len(NORMS), norm)


def group_runs(runs):
    """Groups of runs equal in every GROUP_FIELDS key (runs that differ only
    in their seed are repeats), batchnorm first, then by the splitting
    fields; a group's key holds only those, which tell the groups apart."""
    fields = splitting_fields(runs)
    groups = {}
    for run in sorted(runs, key=lambda r: r.name):
        norm = run.config["norm"]
        every = (norm, tuple(run.value(f) for f in GROUP_FIELDS))
        key = tuple((f, run.value(f)) for f in fields)
        groups.setdefault(every, Group(norm, key, [])).runs.append(run)
    return sorted(groups.values(), key=lambda g: (
        norm_rank(g.norm), [sort_key(v) for _, v in g.key]))


def median_seconds(group):
    """Median training seconds per epoch over all epochs of all its runs."""
    return float(pd.concat([run.frame["seconds"] for run in group.runs])
                 .median())


def ratios_to_baseline(groups):
    """Each group's median s/epoch over that of the batchnorm group with the
    same other key fields; None where there is no such group."""
    baseline = {g.key: median_seconds(g) for g in groups if g.norm == BASELINE}
    return [median_seconds(g) / baseline[g.key] if g.key in baseline else None
            for g in groups]


def format_percent(values):
    """Mean of accuracies in [0, 1] as a percentage, ± std over runs."""
    values = pd.Series(values, dtype=float) * 100
    if len(values) == 1 or values.isna().any():
        return f"{values.mean():.2f}"
    return f"{values.mean():.2f} ± {values.std():.2f}"


def format_epochs(group):
    done = sorted({len(run.frame) for run in group.runs})
    text = str(done[0]) if len(done) == 1 else f"{done[0]}–{done[-1]}"
    planned = {run.config.get("epochs") for run in group.runs}
    if len(planned) == 1:
        planned = planned.pop()
        if isinstance(planned, int) and done[0] < planned:
            text += f"/{planned}"
    return text


def common_value(group, field):
    values = {str(run.config.get(field, "?")) for run in group.runs}
    return ", ".join(sorted(values))


def markdown_table(header, rows):
    widths = [max(len(str(cell)) for cell in column)
              for column in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w)
                                 for c, w in zip(cells, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule] + [line(row) for row in rows])


# ------------------------------------------------------------- provenance
def provenances(group):
    """Each run's `provenance` record, None where it has none (older code)
    or where it is not a record."""
    return [record if isinstance(record := run.config.get("provenance"), dict)
            else None for run in group.runs]


# What a warning says of the groups with each kind of provenance problem.
PROVENANCE_WARNINGS = {
    "none": "runs with no provenance (older code)",
    "unknown": "runs of an unknown commit (not run from a git checkout)",
    "commits": "runs from different commits",
    "dirty": "runs from a dirty tree (uncommitted changes)",
}


def provenance_problems(group):
    """Why a group's runs may not be the same code, as (kind, text) with the
    kinds of PROVENANCE_WARNINGS: none recorded, no commit known, several
    commits, a dirty tree. Empty for runs of one clean commit."""
    records = provenances(group)
    known = [r for r in records if r is not None]
    problems = []
    if len(known) < len(records):
        problems.append(("none", "no provenance" if not known else
                         f"{len(records) - len(known)} of {len(records)} "
                         "runs without provenance"))
    commits = {r.get("commit") for r in known}
    if None in commits:
        problems.append(("unknown", "commit unknown"))
    if len(commits - {None}) > 1:
        problems.append(("commits", f"{len(commits - {None})} commits"))
    if any(r.get("dirty") is not False for r in known):
        problems.append(("dirty", "dirty tree"))
    return problems


def provenance_cell(group):
    """timing.md's note beside a group: its commit(s), and its problems."""
    commits = sorted({str(r.get("commit"))[:7] for r in provenances(group)
                      if r is not None and r.get("commit")})
    problems = [text for _, text in provenance_problems(group)]
    text = ", ".join(commits[:3] + (["..."] if len(commits) > 3 else []))
    if problems:
        text = "⚠ " + "; ".join(problems) + (f" ({text})" if text else "")
    return text


def warn_provenance(groups):
    """One warning per kind of problem, naming the groups that have it (one
    line, not one per group: old histories would flood stderr)."""
    flagged = {}
    for group in groups:
        for kind, text in provenance_problems(group):
            flagged.setdefault(kind, []).append(f"{group.label} ({text})")
    for kind, labels in flagged.items():
        warn(f"{len(labels)} group(s) of {PROVENANCE_WARNINGS[kind]}; see "
             f"the code column of timing.md: {' | '.join(labels)}")


def result_values(group, key):
    """Each run's `result[key]` (accuracies in [0, 1]), None for a run
    without it (unfinished, or a history older than the key)."""
    values = []
    for run in group.runs:
        result = run.config.get("result")
        value = result.get(key) if isinstance(result, dict) else None
        values.append(value if isinstance(value, (int, float)) else None)
    return values


def format_results(values):
    """format_percent of the runs that have the value, "(k of n runs)" when
    some lack it, "–" when none has it."""
    known = [v for v in values if v is not None]
    if not known:
        return "–"
    text = format_percent(known)
    if len(known) < len(values):
        text += f" ({len(known)} of {len(values)} runs)"
    return text


def test_images_text(groups):
    """How many test images the test accuracies count."""
    images = {run.config["result"].get("test_images") for g in groups
              for run in g.runs if isinstance(run.config.get("result"), dict)}
    images.discard(None)
    return (f"all {images.pop()} test images" if len(images) == 1
            else "the whole test set")


def validation_text(groups):
    """Where the groups' validation images come from (`val_from`, and how
    many: `val_size`)."""
    pairs = sorted({(str(run.value("val_from")), run.value("val_size"))
                    for group in groups for run in group.runs},
                   key=lambda pair: (pair[0], sort_key(pair[1])))
    return "; ".join(validation_source(*pair) for pair in pairs)


def validation_source(source, size):
    """What `size` validation images from `source` are, in words."""
    if source == "train":
        count = "images" if size is None else f"{size} images"
        return (f"{count} held out of the training set (`val_from` train; "
                "never trained on)")
    if source == "test":
        where = ("the whole test set" if size is None
                 else f"a subset of {size} test images")
        return (f"{where} (`val_from` test, as in 2017: validation and test "
                "accuracies are not independent)")
    return f"{'all' if size is None else size} images from {source}"


def group_row(group, ratio, best_weights):
    """The cells of a group's row in timing.md's main table."""
    frames = [r.frame["val_accuracy"] for r in group.runs]
    tests = [format_results(result_values(group, "test_accuracy"))]
    if best_weights:
        tests.append(format_results(result_values(group,
                                                  "best_test_accuracy")))
    return (group.label, len(group.runs), format_epochs(group), *tests,
            format_percent([f.max() for f in frames]),
            format_percent([f.iloc[-1] for f in frames]),
            f"{median_seconds(group):.2f}",
            "n/a" if ratio is None else f"{ratio:.2f}",
            provenance_cell(group), common_value(group, "device"),
            common_value(group, "backend"))


def timing_report(groups, runs, history_dirs):
    """timing.md: a row per group, test accuracy first, then validation
    accuracy, then speed, with a note of what each column counts."""
    best_weights = any(v is not None for g in groups
                       for v in result_values(g, "best_test_accuracy"))
    header = ("group", "runs", "epochs", "test acc, last weights (%)",
              *(["test acc, best-val weights (%)"] if best_weights else []),
              "best val acc (%)", "final val acc (%)", "median s/epoch",
              "ratio to batchnorm", "code", "device", "backend")
    rows = [group_row(group, ratio, best_weights)
            for group, ratio in zip(groups, ratios_to_baseline(groups))]
    source = ", ".join(f"`{d}`" for d in history_dirs)
    best_note = (" Best-val weights: the weights of the epoch with the best "
                 "validation accuracy, on the same test images."
                 if best_weights else "")
    return (
        f"# Timing\n\n{len(runs)} run(s) from {source}, in {len(groups)} "
        f"group(s).\n\n{markdown_table(header, rows)}\n\n"
        "Test accuracy: mean (± std over runs) of each run's last weights on "
        f"{test_images_text(groups)}.{best_note} Validation accuracy: mean "
        "(± std over runs) of each run's best and final epoch; validation "
        f"images: {validation_text(groups)}. Median s/epoch: median wall time "
        "of an epoch's training steps over all epochs of the group's runs "
        "(evaluation excluded). Ratio: to the batchnorm group with the same "
        "other settings. Code: the commit the runs ran (⚠: mixed commits, a "
        "dirty tree, or no provenance recorded).\n")


# ------------------------------------------------- what a figure's runs are
TRAIN_IMAGES, TEST_IMAGES = 50000, 10000
HELD_OUT = TRAIN_IMAGES // 10  # train.py's default --val-size (val_from train)
# How a title names a protocol key's value where a run departs from it.
DEPARTURE_TEXT = {
    "epochs": "{} epochs", "batch_size": "batch {}",
    "classes_per_batch": "{} classes/batch", "optimizer": "optimizer {}",
    "lr": "lr {}", "lr_milestones": "lr milestones {}",
    "lr_gamma": "lr gamma {}", "sgd_momentum": "SGD momentum {}",
    "nesterov": "Nesterov {}", "weight_decay": "weight decay {}",
    "augment": "augmentation {}", "dropout": "dropout {}",
    "norm_momentum": "norm momentum {}", "norm_epsilon": "norm epsilon {}",
    "r_max": "r_max {}", "d_max": "d_max {}",
    "warmup_steps": "warm-up {} steps", "r_max_steps": "r_max ramp {} steps",
    "d_max_steps": "d_max ramp {} steps",
    "renorm_schedule": "renorm schedule {} of the steps",
}
TITLE_WIDTH = 110  # characters per line of a figure's title


def value_text(value):
    """A setting's value as a title writes it (on/off, a,b,c, none)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(value_text, value)) or "none"
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def same(value, reference):
    """Equal as a history stores them (JSON lists for tuples)."""
    as_list = (lambda v: list(v) if isinstance(v, (list, tuple)) else v)
    return as_list(value) == as_list(reference)


def protocol_departures(config):
    """(key, text) of each protocol key in which a run departs from the
    protocol it names; the network as one (WRN-d-k); the schedule's steps
    not where --renorm-schedule set them."""
    name = config.get("protocol")
    if not isinstance(name, str) or name not in PROTOCOLS:
        return [("protocol", f"protocol {name!r} unknown: not compared")]
    protocol, found = PROTOCOLS[name], []
    if not all(same(config.get(k, getattr(protocol, k)), getattr(protocol, k))
               for k in ("depth", "width")):
        found.append(("network", f"WRN-{config.get('depth', '?')}-"
                                 f"{config.get('width', '?')}"))
    skip = {"depth", "width"} | (set(SCHEDULE_STEPS)
                                 if config.get("renorm_schedule") else set())
    for key in PROTOCOL_KEYS:
        if key in skip or key not in config:
            continue
        if not same(config[key], getattr(protocol, key)):
            found.append((key, DEPARTURE_TEXT.get(key, key + " {}").format(
                value_text(config[key]))))
    return found


def run_departures(config):
    """(key, text) of each setting of a run that departs from its protocol
    run on the full data set: the network, the data's sizes and where the
    validation images come from, the other protocol keys, the precision,
    the devices."""
    found = protocol_departures(config)
    train, val = config.get("train_size"), config.get("val_size")
    data = []
    # The protocol's data: a tenth of the training set held out for
    # validation (train.py's default), the rest trained on.
    held_out = config.get("val_from") == "train"
    if train not in (None, TRAIN_IMAGES - HELD_OUT if held_out
                     else TRAIN_IMAGES):
        data.append(("train_size", f"{train} training images"))
    if held_out and val not in (None, HELD_OUT):
        data.append(("val_size", f"{val} held-out validation images"))
    elif not held_out:
        data.append(("val_size", "validation on " + (
            "all" if val in (None, TEST_IMAGES) else str(val))
            + " test images (as in 2017)"))
    at = 1 if found and found[0][0] == "network" else 0
    found[at:at] = data
    if config.get("precision") not in (None, "float32"):
        found.append(("precision", f"precision {config['precision']}"))
    if config.get("virtual_batch_size") is not None:
        found.append(("virtual_batch_size",
                      f"virtual batch {config['virtual_batch_size']}"))
    if config.get("devices") not in (None, 1):
        found.append(("devices", f"{config['devices']} devices"))
    return found


def values_text(values):
    """A few values, or their range."""
    values = sorted(set(values), key=sort_key)
    if len(values) > 4 and all(sort_key(v)[0] == 1 for v in values):
        return f"{value_text(values[0])}–{value_text(values[-1])}"
    return ", ".join(map(value_text, values))


def setting_text(key, runs):
    """What `key` is in each of `runs`, for a title's "by group" line."""
    if key == "network":
        return "network " + ", ".join(sorted({
            f"WRN-{r.value('depth')}-{r.value('width')}" for r in runs}))
    if key == "classes_per_batch":
        return "sampling " + ", ".join(sampling_text(c) for c in sorted(
            {r.value(key) for r in runs}, key=sort_key))
    return f"{key.replace('_', ' ')} {values_text(r.value(key) for r in runs)}"


def describe_runs(runs):
    """Lines for a figure's title: the protocol(s) and every departure from
    them that all runs share; those that differ between runs; the device."""
    found = [dict(run_departures(run.settings)) for run in runs]
    keys = list(dict.fromkeys(k for f in found for k in f))
    common = [k for k in keys if all(f.get(k) == found[0].get(k)
                                     for f in found)]
    protocols = "/".join(sorted({str(r.settings.get("protocol"))
                                 for r in runs}))
    lines = [f"protocol {protocols}" + (
        ", except: " + ", ".join(found[0][k] for k in common) if common
        else " as specified, on the full data set")]
    varying = sorted((k for k in keys if k not in common),
                     key=lambda k: keys.index(k) if k not in PROTOCOL_KEYS
                     else PROTOCOL_KEYS.index(k))
    if varying:
        lines.append("by group: " + "; ".join(setting_text(k, runs)
                                               for k in varying))
    lines.append(device_text(runs))
    return [textwrap.fill(line, TITLE_WIDTH, break_on_hyphens=False)
            for line in lines]


def device_text(runs):
    """The device and backend the runs ran on, for a title."""
    devices = sorted({f"{r.value('device')} ({r.value('backend')})"
                      for r in runs})
    return ("on " + devices[0] if len(devices) == 1
            else f"on {len(devices)} devices/backends, by group")


def figure_title(text, groups, runs):
    """`text`, what the bands are, then `describe_runs`' lines."""
    several = any(len(g.runs) > 1 for g in groups)
    band = "; lines: mean over runs, bands: min–max" if several else ""
    return "\n".join([f"{text}{band}", *describe_runs(runs)])


# ----------------------------------------------------------- the curves
# The panels of a row of curves: (column, title, scale).
PANELS = (("loss", "train loss", 1), ("val_loss", "validation loss", 1),
          ("accuracy", "train accuracy (%)", 100),
          ("val_accuracy", "validation accuracy (%)", 100))
MAX_LINES = 8  # lines in one panel; more groups get a row of panels each
WARMUP_STYLE = (0, (1, 2))  # the line that marks the end of the warm-up


def key_value(group, field):
    """The value of a splitting field in a group's key."""
    return dict(group.key).get(field)


def crowded(groups, facets):
    """Whether a panel per value of `facets` would hold more than MAX_LINES
    lines, or more combinations of the other fields than line styles."""
    rest = [f for f, _ in groups[0].key if f not in facets]
    panels = {}
    for group in groups:
        panels.setdefault(tuple(key_value(group, f) for f in facets),
                          []).append(tuple(key_value(group, f) for f in rest))
    return any(len(lines) > MAX_LINES or len(set(lines)) > len(LINESTYLES)
               for lines in panels.values())


def facet_fields(groups):
    """The key fields that get a row of panels per value (those with the
    most values first) until every panel is legible (not `crowded`)."""
    fields, facets = [f for f, _ in groups[0].key], []
    while crowded(groups, facets) and len(facets) < len(fields):
        rest = [f for f in fields if f not in facets]
        facets.append(max(rest, key=lambda f: len(
            {key_value(g, f) for g in groups})))
    return [f for f in fields if f in facets]  # in label order


def facet_rows(groups, facets):
    """[(facet key, groups)] in the order of the facet fields' values."""
    rows = {}
    for group in groups:
        facet = tuple((f, key_value(group, f)) for f in facets)
        rows.setdefault(facet, []).append(group)
    return sorted(rows.items(),
                  key=lambda row: [sort_key(v) for _, v in row[0]])


def curve_styles(groups, facets):
    """Per group label: (colour by norm, line style by the key fields that
    are not facets, marker on short runs, legend label less the facets)."""
    colors = norm_colors(sorted({g.norm for g in groups}, key=norm_rank))
    rests = list(dict.fromkeys(
        tuple((f, v) for f, v in g.key if f not in facets) for g in groups))
    short = max(len(run.frame) for g in groups for run in g.runs) <= 25
    styles = {}
    for group in groups:
        rest = tuple((f, v) for f, v in group.key if f not in facets)
        styles[group.label] = (
            colors[group.norm],
            LINESTYLES[rests.index(rest) % len(LINESTYLES)],
            "o" if short else None,
            ", ".join([group.norm] + [field_text(f, v) for f, v in rest]))
    return styles


def plot_group(ax, group, column, style, scale=1.0):
    """Mean of `column` over the group's runs against epoch, with a min–max
    band where there are several runs."""
    frame = pd.concat([run.frame[["epoch", column]] for run in group.runs])
    stats = frame.groupby("epoch")[column].agg(["mean", "min", "max"]) * scale
    color, linestyle, marker, _ = style
    ax.plot(stats.index, stats["mean"], color=color, linestyle=linestyle,
            marker=marker, markersize=4)
    if len(group.runs) > 1:
        ax.fill_between(stats.index, stats["min"], stats["max"], color=color,
                        alpha=0.2, linewidth=0)


def warmup_epochs(group):
    """Where a renorm group's bounds start to relax, in epochs: its
    warmup_steps over its steps_per_epoch (within the epochs drawn)."""
    if group.norm != "renorm":
        return set()
    last = max(len(run.frame) for run in group.runs)
    found = set()
    for run in group.runs:
        steps, per_epoch = (run.settings.get("warmup_steps"),
                            run.settings.get("steps_per_epoch"))
        if (isinstance(steps, (int, float)) and isinstance(per_epoch, int)
                and per_epoch > 0 and 0 < steps / per_epoch <= last):
            found.add(steps / per_epoch)
    return found


def mark_warmups(ax, groups, styles):
    """A vertical line where each renorm group's warm-up ends; whether any."""
    drawn = False
    for group in groups:
        for epoch in warmup_epochs(group):
            ax.axvline(epoch, color=styles[group.label][0],
                       linestyle=WARMUP_STYLE, linewidth=1.3, alpha=0.8)
            drawn = True
    return drawn


def curve_legend(fig, groups, styles, warmup):
    """One entry per line style and colour (the facets are in the rows),
    and the warm-up's mark where drawn."""
    entries = {style[3]: style for style in
               (styles[g.label] for g in groups)}
    handles = [Line2D([], [], color=c, linestyle=ls, marker=m, markersize=4,
                      label=label) for label, (c, ls, m, _) in entries.items()]
    norms = list(dict.fromkeys(g.norm for g in groups))
    per_norm = len(handles) // len(norms)
    # A column per norm where each has as many entries (the legend fills
    # columns first), the warm-up's mark in a column of its own.
    columns = (len(norms) if per_norm * len(norms) == len(handles)
               and per_norm <= 4 else 3)
    if warmup:
        rows = -(-len(handles) // columns)
        handles.append(Line2D([], [], color="grey", linestyle=WARMUP_STYLE,
                              label="renorm: warm-up over, the bounds start "
                                    "to relax"))
        handles += [Line2D([], [], visible=False, label=" ")] * (rows - 1)
        columns += 1
    fig.legend(handles=handles, loc="outside lower center",
               ncol=min(len(handles), columns), frameon=False)


def curve_axes(rows):
    """The figure and a list of 4 axes (PANELS' order) per row: 2 x 2 for
    one row, else a row of 4 panels per facet (shared y per column)."""
    if len(rows) == 1:
        fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True,
                                 sharey="row", layout="constrained")
        return fig, [list(axes.flat)]
    fig, axes = plt.subplots(len(rows), 4, figsize=(17, 1.8 + 2.6 * len(rows)),
                             sharex=True, sharey="col", squeeze=False,
                             layout="constrained")
    return fig, [list(row) for row in axes]


def format_curve_axes(grid, rows):
    """Titles, log-scaled losses, integer epochs; each row's facet named
    beside its first panel."""
    for number, (panels, (facet, _)) in enumerate(zip(grid, rows)):
        for ax, (column, title, _) in zip(panels, PANELS):
            if len(rows) == 1 or number == 0:
                ax.set_title(title)
            if column.endswith("loss"):
                ax.set_yscale("log")
                ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))
                ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
                ax.yaxis.set_minor_formatter(StrMethodFormatter("{x:g}"))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        unit = ("loss", "accuracy (%)")
        if len(rows) == 1:
            for ax, label in zip((panels[0], panels[2]), unit):
                ax.set_ylabel(label)
        else:
            facet_label = ", ".join(field_text(f, v) for f, v in facet)
            panels[0].set_ylabel(f"{facet_label}\nloss")
            panels[2].set_ylabel("accuracy (%)")
    for ax in grid[-1] if len(rows) > 1 else grid[0][2:]:
        ax.set_xlabel("epoch")


def plot_curves(groups, runs):
    """Train and validation loss and accuracy against epoch: a colour per
    norm; with many groups, a row of panels per value of the fields that
    split them most (facets), so that no panel holds more than MAX_LINES
    lines; renorm's warm-up end marked."""
    facets = facet_fields(groups)
    rows = facet_rows(groups, facets)
    styles = curve_styles(groups, facets)
    fig, grid = curve_axes(rows)
    warmup = False
    for panels, (_, members) in zip(grid, rows):
        for ax, (column, _, scale) in zip(panels, PANELS):
            for group in members:
                plot_group(ax, group, column, styles[group.label], scale)
            warmup = mark_warmups(ax, members, styles) or warmup
    format_curve_axes(grid, rows)
    fig.suptitle(figure_title("Training curves" + (
        " (a row per " + ", ".join(facets) + ")" if len(rows) > 1 else ""),
        groups, runs))
    curve_legend(fig, groups, styles, warmup)
    return fig


# ---------------------------------------------------------------- seconds
def plot_seconds(groups, runs):
    """Median training seconds per epoch, a horizontal bar per group (the
    groups of one setting side by side, a colour per norm), each epoch a
    dot (the first, which compiles, hollow), the median and its ratio to
    batchnorm written beside it: one line per group, none overprinted."""
    ordered = sorted(groups, key=lambda g: (
        [sort_key(v) for _, v in g.key], norm_rank(g.norm)))
    ratios = dict(zip([g.label for g in groups], ratios_to_baseline(groups)))
    colors = norm_colors(sorted({g.norm for g in groups}, key=norm_rank))
    fig, ax = plt.subplots(figsize=(11, max(4, 2.6 + 0.36 * len(ordered))),
                           layout="constrained")
    longest = max(run.frame["seconds"].max() for run in runs)
    for y, group in enumerate(ordered):
        seconds_row(ax, y, group, colors[group.norm], ratios[group.label],
                    longest)
        if y and ordered[y - 1].key != group.key:  # a new setting
            ax.axhline(y - 0.5, color="0.8", linewidth=0.8)
    ax.set_yticks(range(len(ordered)), [g.label for g in ordered],
                  fontsize=9)
    ax.set_ylim(len(ordered) - 0.5, -0.5)  # the first group on top
    ax.set_xlim(0, longest * 1.25)
    ax.set_xlabel("training seconds per epoch (evaluation excluded)")
    ax.grid(axis="y", visible=False)
    handles = [Patch(color=colors[n], alpha=0.55, label=f"{n}: median")
               for n in colors] + [
        Line2D([], [], color="grey", marker="o", linestyle="", markersize=4,
               label="an epoch"),
        Line2D([], [], color="grey", marker="o", linestyle="",
               markerfacecolor="none", markersize=6,
               label="first epoch (compiles)")]
    fig.legend(handles=handles, loc="outside lower center",
               ncol=len(handles), frameon=False)
    fig.suptitle(figure_title("Training seconds per epoch (× = ratio to "
                              "batchnorm)", [], runs))
    return fig


def seconds_row(ax, y, group, color, ratio, longest):
    """A group's bar (the median), its epochs as dots, and its numbers."""
    median = median_seconds(group)
    ax.barh(y, median, height=0.7, color=color, alpha=0.55)
    later = [s for run in group.runs for s in run.frame["seconds"].iloc[1:]]
    firsts = [run.frame["seconds"].iloc[0] for run in group.runs]
    # A fixed jitter: the same figure from the same histories.
    jitter = np.random.default_rng(y).uniform(-0.2, 0.2, len(later))
    ax.scatter(later, y + jitter, s=10, color=color, zorder=3)
    ax.scatter(firsts, [y] * len(firsts), s=30, facecolors="none",
               edgecolors=color, zorder=3)
    right = max([median, *later, *firsts])
    ax.text(right + longest * 0.015, y, f"{median:.2f} s" + (
        "" if ratio is None else f"  ×{ratio:.2f}"), va="center", fontsize=9)


# ------------------------------------------- batch sizes and non-i.i.d. runs
SWEEP_FIELDS = ("batch_size", "classes_per_batch")


@dataclass
class Point:
    """The runs of one norm, sampling and batch size (seeds are repeats)."""

    norm: str
    classes: object  # classes_per_batch: None for i.i.d.
    rest: tuple  # ((field, value), ...) of other fields that split runs
    batch_size: object
    runs: list

    def values(self, which):
        """Each run's best or final validation accuracy, in percent."""
        column = [run.frame["val_accuracy"] for run in self.runs]
        return np.array([c.max() if which == "best" else c.iloc[-1]
                         for c in column]) * 100

    def test_values(self, key="test_accuracy"):
        """Each run's test accuracy (`key`: test_accuracy, the last weights;
        best_test_accuracy, the best-val weights), in percent; None when a
        run has no such result (unfinished, or an older history)."""
        results = [run.config.get("result") for run in self.runs]
        if not all(isinstance(r, dict) and isinstance(r.get(key), (int, float))
                   for r in results):
            return None
        return np.array([r[key] for r in results]) * 100

    def test_images(self):
        return {run.config["result"].get("test_images") for run in self.runs}

    @property
    def line(self):
        return (self.norm, self.classes, self.rest)


def sweep_points(runs):
    """The runs by norm, sampling, other splitting fields and batch size,
    ordered by norm, sampling (i.i.d. first), those fields, batch size."""
    rest_fields = [f for f in splitting_fields(runs) if f not in SWEEP_FIELDS]
    points = {}
    for run in sorted(runs, key=lambda r: r.name):
        rest = tuple((f, run.value(f)) for f in rest_fields)
        key = (run.config["norm"], run.value("classes_per_batch"), rest,
               run.value("batch_size"))
        if key not in points:
            points[key] = Point(*key, [])
        points[key].runs.append(run)
    return sorted(points.values(), key=lambda p: (
        norm_rank(p.norm), sort_key(p.classes),
        [sort_key(v) for _, v in p.rest], sort_key(p.batch_size)))


def has_sweep(runs):
    """Whether the runs span several batch sizes or include non-i.i.d. ones."""
    return (len({run.value("batch_size") for run in runs}) > 1
            or any(run.value("classes_per_batch") is not None
                   for run in runs))


def line_label(norm, classes, rest):
    return ", ".join([norm, sampling_text(classes)]
                     + [field_text(f, v) for f, v in rest])


def norm_colors(norms):
    palette = sns.color_palette("colorblind", len(NORMS) + len(norms))
    extra = [n for n in norms if n not in NORMS]
    return {n: palette[NORMS.index(n) if n in NORMS
                       else len(NORMS) + extra.index(n)] for n in norms}


def sampling_styles(points):
    """Line style per sampling (solid for i.i.d.) and marker per rest."""
    samplings = sorted({p.classes for p in points}, key=sort_key)
    non_iid = [c for c in samplings if c is not None]
    linestyles = {None: "-"}
    linestyles.update({c: LINESTYLES[1 + i % (len(LINESTYLES) - 1)]
                       for i, c in enumerate(non_iid)})
    rests = list(dict.fromkeys(p.rest for p in points))
    markers = dict(zip(rests, "osD^v<>px*"))
    return linestyles, markers


def batch_size_axis(ax, sizes):
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("batch size (log scale)")


def accuracy_panels(points):
    """(title, each run's accuracy in percent) of each panel: test accuracy
    first where every run has it, then best and final validation."""
    panels = []
    if all(p.test_values() is not None for p in points):
        panels.append(("test accuracy (last weights)", Point.test_values))
    return panels + [("best validation accuracy",
                      lambda p: p.values("best")),
                     ("final validation accuracy",
                      lambda p: p.values("final"))]


def rest_rows(points):
    """[(rest, points)]: one row for all where a panel holds no more than
    MAX_LINES lines, else a row per value of the other splitting fields."""
    if len({p.line for p in points}) <= MAX_LINES:
        return [((), points)]
    rests = list(dict.fromkeys(p.rest for p in points))
    return [(rest, [p for p in points if p.rest == rest]) for rest in rests]


def accuracy_lines(ax, points, accuracy, styles):
    """A line per norm and sampling (and rest) against batch size, with
    min–max bars where there are several runs."""
    colors, linestyles, markers = styles
    for line in dict.fromkeys(p.line for p in points):
        members = [p for p in points if p.line == line]
        values = [accuracy(p) for p in members]
        mean = np.array([v.mean() for v in values])
        errors = np.array([[v.mean() - v.min() for v in values],
                           [v.max() - v.mean() for v in values]])
        norm, classes, rest = line
        ax.errorbar([p.batch_size for p in members], mean,
                    yerr=errors if errors.any() else None,
                    color=colors[norm], linestyle=linestyles[classes],
                    marker=markers[rest], markersize=5, capsize=3,
                    label=line_label(*line))


def plot_accuracy_vs_batch_size(points, runs):
    """Accuracy against batch size, a panel per measure (test accuracy
    first where there), a row per other setting where lines would crowd."""
    panels, rows = accuracy_panels(points), rest_rows(points)
    fig, axes = plt.subplots(
        len(rows), len(panels), squeeze=False, sharey=True,
        figsize=(5.5 * len(panels), 1.5 + 3.8 * len(rows)),
        layout="constrained")
    styles = (norm_colors(list(dict.fromkeys(p.norm for p in points))),
              *sampling_styles(points))
    sizes = sorted({p.batch_size for p in points}, key=sort_key)
    for number, (rest, members) in enumerate(rows):
        for ax, (title, accuracy) in zip(axes[number], panels):
            accuracy_lines(ax, members, accuracy, styles)
            batch_size_axis(ax, sizes)
            ax.set_title(", ".join([title] + [field_text(f, v)
                                              for f, v in rest]))
        axes[number, 0].set_ylabel("accuracy (%)")
    several = any(len(p.runs) > 1 for p in points)
    fig.suptitle(figure_title(
        "Accuracy against batch size (solid: i.i.d. batches, dashed: K "
        "classes per batch)" + ("; bars: min–max over runs" if several
                                else ""), [], runs))
    handles = {}
    for ax in axes.flat:  # every line once, from whichever row has it
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(list(handles.values()), list(handles),
               loc="outside lower center", ncol=min(len(handles), 3),
               frameon=False)
    return fig


def non_iid_bars(ax, points, colors, sizes):
    """Bars of best val accuracy per batch size, norm and sampling."""
    bars = list(dict.fromkeys(p.line for p in points))
    width = 0.8 / len(bars)
    for number, line in enumerate(bars):
        norm, classes, rest = line
        members = {p.batch_size: p for p in points if p.line == line}
        x = [sizes.index(b) - 0.4 + (number + 0.5) * width for b in members]
        heights = [p.values("best").mean() for p in members.values()]
        ax.bar(x, heights, width, color=colors[norm],
               alpha=0.45 if classes is None else 0.9,
               hatch=None if classes is None else "//",
               edgecolor="white", label=line_label(*line))
    ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
    ax.set(xlabel="batch size", ylabel="best validation accuracy (%)")


def non_iid_drops(ax, points, colors, styles, sizes):
    """Per norm and K: best val accuracy with K classes per batch minus
    i.i.d., against batch size."""
    linestyles, markers = styles
    drawn = False
    for line in dict.fromkeys(p.line for p in points):
        norm, classes, rest = line
        if classes is None:
            continue
        iid = {p.batch_size: p for p in points
               if p.line == (norm, None, rest)}
        members = [p for p in points
                   if p.line == line and p.batch_size in iid]
        if not members:
            continue
        drops = [p.values("best").mean() - iid[p.batch_size]
                 .values("best").mean() for p in members]
        ax.plot([p.batch_size for p in members], drops,
                color=colors[norm], linestyle=linestyles[classes],
                marker=markers[rest], label=line_label(*line))
        drawn = True
    ax.axhline(0, color="grey", linewidth=1)
    if drawn:
        batch_size_axis(ax, sizes)
    ax.set(ylabel="percentage points")


def plot_non_iid(points, runs):
    """Bars of best val accuracy per batch size, norm and sampling, and the
    accuracy each norm loses with non-i.i.d. batches; a row per other
    setting where bars would crowd."""
    rows = rest_rows(points)
    fig, axes = plt.subplots(len(rows), 2, figsize=(13, 1.5 + 3.8 * len(rows)),
                             squeeze=False, layout="constrained")
    colors = norm_colors(list(dict.fromkeys(p.norm for p in points)))
    styles = sampling_styles(points)
    sizes = sorted({p.batch_size for p in points}, key=sort_key)
    for (rest, members), (left, right) in zip(rows, axes):
        where = "".join(", " + field_text(f, v) for f, v in rest)
        non_iid_bars(left, members, colors, sizes)
        left.set_title("i.i.d. (light) and non-i.i.d. (hatched) batches"
                       + where)
        non_iid_drops(right, members, colors, styles, sizes)
        right.set_title("best val accuracy: non-i.i.d. minus i.i.d." + where)
    fig.suptitle(figure_title("Non-i.i.d. minibatches", [], runs))
    handles = {}
    for ax in axes[:, 0]:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(list(handles.values()), list(handles),
               loc="outside lower center", ncol=min(len(handles), 3),
               frameon=False)
    return fig


def batch_table(points, cell):
    """Markdown: a row per norm, sampling (and other splitting fields), a
    column per batch size; `cell(point)` is the text of a cell."""
    sizes = sorted({p.batch_size for p in points}, key=sort_key)
    rest_fields = [f for f, _ in points[0].rest]
    header = ("norm", "sampling", *rest_fields,
              *[f"batch {s}" for s in sizes])
    rows = []
    for line in dict.fromkeys(p.line for p in points):
        norm, classes, rest = line
        cells = {p.batch_size: p for p in points if p.line == line}
        rows.append((norm, sampling_text(classes), *[v for _, v in rest],
                     *[cell(cells[s]) if s in cells else "–" for s in sizes]))
    return markdown_table(header, rows)


def sweep_table(points):
    """Markdown: best / final val accuracy (%) by norm, sampling and batch
    size."""
    def cell(point):
        return (f"{format_percent(point.values('best') / 100)} / "
                f"{format_percent(point.values('final') / 100)}")

    return (
        "**Validation accuracy by batch size and sampling** (best / final, %; "
        "mean ± std over runs where there are several; i.i.d.: random "
        "batches, K classes/batch: every training batch from K classes, "
        "`--classes-per-batch`):\n\n" + batch_table(points, cell) + "\n")


def test_table(points):
    """Markdown: test accuracy by norm, sampling and batch size, the last
    weights' (and the best-val weights' where every run has it, as "last /
    best-val"); "" unless every run has its test result."""
    if any(p.test_values() is None for p in points):
        return ""
    images = set().union(*(p.test_images() for p in points))
    counted = (f"all {images.pop()} test images" if len(images) == 1
               else "the test set")
    best = all(p.test_values("best_test_accuracy") is not None
               for p in points)

    def cell(point):
        text = format_percent(point.test_values() / 100)
        if best:
            text += " / " + format_percent(
                point.test_values("best_test_accuracy") / 100)
        return text

    weights = ("the last / the best-val weights" if best
               else "the last weights")
    return (
        f"**Test accuracy by batch size and sampling** (%, {weights} on "
        f"{counted}; mean ± std over runs where there are several):\n\n"
        + batch_table(points, cell) + "\n")


def save_figure(fig, path):
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    runfiles.write_file(path, image.getvalue())


def update_readme(path, report):
    """Replaces the text between README_BEGIN and README_END in `path` with
    `report` (less its title)."""
    runfiles.replace_block(path, README_BEGIN, README_END,
                           report.split("\n\n", 1)[1])


def main(argv=None):
    args = parse_args(argv)
    runs = load_runs(history_paths(args.runs, args.history_dir))
    if not runs:
        where = ("among the named runs" if args.runs
                 else f"in {args.history_dir}")
        print(f"{PROG}: error: no usable history {where}", file=sys.stderr)
        return 1
    groups = group_runs(runs)
    warn_provenance(groups)
    report = timing_report(groups, runs,
                           sorted({str(run.path.parent) for run in runs}))
    points = sweep_points(runs) if has_sweep(runs) else []
    if points:
        tests = test_table(points)
        report += ("\n" + tests if tests else "") + "\n" + sweep_table(points)
    try:
        args.plots_dir.mkdir(parents=True, exist_ok=True)
        sns.set_theme(style="whitegrid", context="notebook")
        save_figure(plot_curves(groups, runs), args.plots_dir / "curves.png")
        save_figure(plot_seconds(groups, runs),
                    args.plots_dir / "seconds_per_epoch.png")
        if len({p.batch_size for p in points}) > 1:
            save_figure(plot_accuracy_vs_batch_size(points, runs),
                        args.plots_dir / "accuracy_vs_batch_size.png")
        if any(p.classes is not None for p in points):
            save_figure(plot_non_iid(points, runs),
                        args.plots_dir / "non_iid.png")
        runfiles.write_file(args.plots_dir / "timing.md", report.encode())
    except (OSError, runfiles.WriteError) as error:
        print(f"{PROG}: error: cannot write to {args.plots_dir}: {error}",
              file=sys.stderr)
        return 1
    if args.readme:
        try:
            update_readme(args.readme, report)
        except (OSError, ValueError, runfiles.WriteError) as error:
            print(f"{PROG}: error: {error}", file=sys.stderr)
            return 1
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
