"""The corrections study's tables: for runs with train.py's corrections and
training-mode validation, what r and d did and how far the training-mode
outputs were from the inference outputs, per cell (norm, normalization
group V, sampling, and any other setting that differs), with paired
differences by seed against batchnorm of the same V and sampling.

Per run: the last epoch's gap `val_accuracy - val_accuracy_train_mode`
(points; positive: inference is the better of the two), its mean over the
epochs, and, for renorm, the last epoch's `r_dev`, `d_dev`, `r_clipped` and
`d_clipped` averaged over the layers (NAME.corrections.csv); the test
accuracy of the last weights. Means over seeds with 95% t-intervals
(`report.t_interval`)."""

import csv
import json
from pathlib import Path

from experiment import report

CORRECTIONS = ("r_dev", "d_dev", "r_clipped", "d_clipped")
# Settings that make a cell, besides norm, V and sampling (a variant).
VARIANT_KEYS = ("norm_momentum", "renorm_schedule", "r_max", "d_max")


def load(history_dirs):
    """The runs of `history_dirs` that have training-mode validation: a
    list of dicts (config, rows, corrections rows, test accuracy)."""
    runs = []
    for folder in history_dirs:
        for path in sorted(Path(folder).glob("*.json")):
            try:
                run = load_run(path)
            except (OSError, ValueError, KeyError, TypeError, csv.Error):
                continue  # damaged: plot.py names it when it skips it
            if run is not None:
                runs.append(run)
    return runs


def load_run(path):
    """The run of the JSON `path`, or None where it has no training-mode
    validation or has not finished."""
    config = json.loads(path.read_text())
    csv_path = path.with_suffix(".csv")
    if not (isinstance(config, dict) and config.get("train_mode_validation")
            and csv_path.is_file()):
        return None
    rows = read_rows(csv_path)
    if not rows or len(rows) < config.get("epochs", 0):
        return None  # unfinished
    for row in rows:  # numbers, or the run is damaged
        float(row["val_accuracy"]), float(row["val_accuracy_train_mode"])
    corrections = path.with_name(f"{path.stem}.corrections.csv")
    return {"config": config, "rows": rows,
            "corrections": read_rows(corrections)
            if corrections.is_file() else [],
            "test": 100 * (config.get("result") or {}).get(
                "test_accuracy", float("nan"))}


def read_rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def cell_of(config, variants):
    """(norm, V, sampling, variant text) of a run; `variants`: the
    VARIANT_KEYS whose values differ among the runs of its norm."""
    group = config.get("virtual_batch_size") or config.get("batch_size")
    variant = ", ".join(f"{key} {value_text(config.get(key))}"
                        for key in variants)
    return config["norm"], group, config.get("sampling", "iid"), variant


def value_text(value):
    return ",".join(map(str, value)) if isinstance(value, list) else str(
        value)


def measures(run):
    """The per-run measures (points, and fractions as they are)."""
    gaps = [100 * (float(r["val_accuracy"])
                   - float(r["val_accuracy_train_mode"]))
            for r in run["rows"]]
    result = {"test": run["test"], "gap_last": gaps[-1],
              "gap_mean": sum(gaps) / len(gaps)}
    last_epoch = run["rows"][-1]["epoch"]
    last = [r for r in run["corrections"] if r["epoch"] == last_epoch]
    for key in CORRECTIONS:
        result[key] = (sum(float(r[key]) for r in last) / len(last)
                       if last else None)
    return result


def cells(runs):
    """{cell: {seed: measures}}, cells in a stable order."""
    varying = [key for key in VARIANT_KEYS
               if len({value_text(r["config"].get(key)) for r in runs
                       if r["config"]["norm"] == "renorm"}) > 1]
    table = {}
    for run in sorted(runs, key=lambda r: (r["config"]["norm"],
                                           cell_of(r["config"], varying))):
        cell = cell_of(run["config"], varying if run["config"]["norm"]
                       == "renorm" else [])
        table.setdefault(cell, {})[run["config"].get("seed", 0)] = (
            measures(run))
    return table


def tables(history_dirs):
    """The study's markdown: the cells, then renorm - batchnorm paired by
    seed; None without runs."""
    runs = load(history_dirs)
    if not runs:
        return None
    table = cells(runs)
    header = ("norm", "V", "sampling", "variant", "test acc (%)",
              "gap, last epoch (points)", "gap, mean over epochs",
              "r_dev", "d_dev", "r clipped", "d clipped")
    lines = []
    for (norm, group, sampling, variant), by_seed in table.items():
        values = list(by_seed.values())
        corrections = [mean_text([v[key] for v in values])
                       for key in CORRECTIONS]
        lines.append([norm, str(group), sampling, variant or "–",
                      report.mean_std_text([v["test"] for v in values]),
                      report.interval_text([v["gap_last"] for v in values]),
                      report.interval_text([v["gap_mean"] for v in values]),
                      *corrections])
    paired = [("renorm - batchnorm", "V", "sampling", "variant",
               "test acc (points)", "gap, last epoch (points)")]
    for (norm, group, sampling, variant), by_seed in table.items():
        base = table.get(("batchnorm", group, sampling, ""))
        if norm != "renorm" or base is None:
            continue
        test = report.paired_differences(
            {s: v["test"] for s, v in by_seed.items()},
            {s: v["test"] for s, v in base.items()})
        gap = report.paired_differences(
            {s: v["gap_last"] for s, v in by_seed.items()},
            {s: v["gap_last"] for s, v in base.items()})
        paired.append(("", str(group), sampling, variant or "–",
                       report.interval_text(test.values()),
                       report.interval_text(gap.values())))
    return (report.markdown_table(header, lines) + "\n\n"
            + report.markdown_table(paired[0], [list(p) for p in paired[1:]])
            + "\n\nMeans over seeds: `mean ± sd (n)` or `mean [95% t-interval]"
            " (n)`; the corrections: the last epoch's means over the layers"
            " and seeds (fractions). Written by `experiment/gap_study.py` "
            "from " + ", ".join(f"`{d}`" for d in history_dirs) + ".\n")


def mean_text(values):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{sum(values) / len(values):.3g}"
