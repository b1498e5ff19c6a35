"""The text that describes groups of runs: timing.md's tables (test and
validation accuracy, seconds per epoch and the ratio to batchnorm, the code
the runs ran; the sweep's tables by batch size and sampling; the
microbatch study's table per cell and its paired differences with their
95% intervals) and the figure titles that state every setting departing
from the protocol."""

import math
import textwrap

import numpy as np
import pandas as pd

from experiment.histories import IGNORED
from experiment.histories import field_text
from experiment.histories import PROVENANCE_WARNINGS
from experiment.histories import provenance_problems
from experiment.histories import provenances
from experiment.histories import sampling_text
from experiment.histories import sort_key
from experiment.histories import warn
from experiment.protocols import PROTOCOL_KEYS
from experiment.protocols import PROTOCOLS
from experiment.protocols import SCHEDULE_STEPS

BASELINE = "batchnorm"


def median_seconds(group):
    """Median training seconds per epoch over all epochs of all its runs."""
    return float(pd.concat([run.frame["seconds"] for run in group.runs])
                 .median())


def ratios_to_baseline(groups):
    """Each group's median s/epoch over that of the batchnorm group with the
    same other key fields (those batchnorm uses); None where there is no
    such group."""
    baseline = {g.key_for(BASELINE): median_seconds(g) for g in groups
                if g.norm == BASELINE}
    return [median_seconds(g) / baseline[g.key_for(BASELINE)]
            if g.key_for(BASELINE) in baseline else None for g in groups]


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
    def as_list(v):
        return list(v) if isinstance(v, (list, tuple)) else v

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
        found.append(("network", (f"WRN-{config.get('depth', '?')}-"
                                  f"{config.get('width', '?')}")))
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
    if config.get("sampling") == "pairs":
        found.append(("sampling", "pairs of a class (sampling pairs)"))
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
    if key == "virtual_batch_size":
        return "normalization group " + ", ".join(
            field_text(key, v) for v in sorted({r.value(key) for r in runs},
                                               key=sort_key))
    if key == "sampling":
        return "sampling " + ", ".join(sorted({str(r.value(key))
                                               for r in runs}))
    used = (r.value(key) for r in runs if r.value(key) != IGNORED)
    return f"{key.replace('_', ' ')} {values_text(used)}"


def describe_runs(runs):
    """Lines for a figure's title: the protocol(s) and every departure from
    them that all runs share; those that differ between runs; the device."""
    found = [dict(run_departures(run.config)) for run in runs]
    keys = list(dict.fromkeys(k for f in found for k in f))
    common = [k for k in keys if all(f.get(k) == found[0].get(k)
                                     for f in found)]
    protocols = "/".join(sorted({str(r.config.get("protocol"))
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


# ------------------------------------------------------ the microbatch study
CONFIDENCE = 0.95
LESS, MORE = "batchnorm", "renorm"  # the paired difference is MORE - LESS


def t_interval(values, confidence=CONFIDENCE):
    """The mean of `values` and the half width of its two-sided Student t
    interval, t(1 - (1 - confidence) / 2, n - 1) * s / sqrt(n) with s the
    sample standard deviation; the half width is None for fewer than two
    values (no spread to estimate)."""
    values = np.asarray(list(values), dtype=float)
    if len(values) == 0:
        return math.nan, None
    if len(values) < 2:
        return float(values.mean()), None
    from scipy import stats

    quantile = stats.t.ppf(1 - (1 - confidence) / 2, len(values) - 1)
    return (float(values.mean()),
            float(quantile * values.std(ddof=1) / math.sqrt(len(values))))


def paired_differences(first, second):
    """{seed: first - second} over the seeds both by-seed dicts have."""
    return {seed: first[seed] - second[seed] for seed in first
            if seed in second}


def interval_text(values):
    """`mean [low, high] (n)`, signed, or the mean alone for one value."""
    mean, half = t_interval(values)
    n = len(list(values))
    if half is None:
        return f"{mean:+.2f} (n={n})" if n else "–"
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] (n={n})"


def mean_std_text(values):
    """`mean ± std (n)` of accuracies in percent."""
    values = list(values)
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f} (1)"
    return (f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} "
            f"({len(values)})")


def micro_lines(points):
    """{(norm, sampling, rest): {group: point}}, in the points' order."""
    lines = {}
    for point in points:
        lines.setdefault(point.line, {})[point.group] = point
    return lines


def group_losses(points):
    """Per line with two groups or more: (line, smallest group, largest
    group, the paired differences by seed: accuracy at the largest minus at
    the smallest, i.e. what the norm loses when its groups shrink)."""
    found = []
    for line, cells in micro_lines(points).items():
        if len(cells) < 2:
            continue
        small, large = min(cells, key=sort_key), max(cells, key=sort_key)
        found.append((line, small, large, paired_differences(
            cells[large].by_seed(), cells[small].by_seed())))
    return found


def renorm_gains(points):
    """(sampling, rest, group, {seed: renorm - batchnorm}) for every cell
    that has both norms."""
    found = []
    lines = micro_lines(points)
    for (norm, sampling, rest), cells in lines.items():
        if norm != MORE:
            continue
        baseline = lines.get((LESS, sampling, rest), {})
        for group, point in cells.items():
            if group in baseline:
                found.append((sampling, rest, group, paired_differences(
                    point.by_seed(), baseline[group].by_seed())))
    return found


def micro_sampling_text(sampling):
    return {"iid": "i.i.d.", "pairs": "pairs"}.get(sampling, sampling)


def microbatch_tables(points):
    """Markdown: test accuracy per norm, sampling and normalization group
    (mean ± std (n) over seeds), the paired differences renorm - batchnorm
    per group and sampling with their 95% t-intervals, and what each norm
    loses from its largest group to its smallest; "" without results."""
    if not any(p.by_seed() for p in points):
        return ""
    groups = sorted({p.group for p in points}, key=sort_key)
    rest_fields = [f for f, _ in points[0].rest]
    header = ("norm", "sampling", *rest_fields, *[f"V={g}" for g in groups])
    rows = []
    for (norm, sampling, rest), cells in micro_lines(points).items():
        rows.append((norm, micro_sampling_text(sampling),
                     *[v for _, v in rest],
                     *[mean_std_text(cells[g].by_seed().values())
                       if g in cells else "–" for g in groups]))
    text = (
        "**Test accuracy by normalization group V and sampling** (%, the "
        "last weights; mean ± std (number of seeds); V: the virtual batch, "
        "or the whole batch where none was set; pairs: every batch made of "
        "pairs of images of a class, V/2 distinct classes per group, "
        "`--sampling pairs`):\n\n" + markdown_table(header, rows) + "\n")
    gains = renorm_gains(points)
    if gains:
        columns = sorted({g for _, _, g, _ in gains}, key=sort_key)
        by_line = {}
        for sampling, rest, group, differences in gains:
            by_line.setdefault((sampling, rest), {})[group] = differences
        rows = [(micro_sampling_text(sampling), *[v for _, v in rest],
                 *[interval_text(cells[g].values()) if g in cells else "–"
                   for g in columns])
                for (sampling, rest), cells in by_line.items()]
        text += (
            f"\n**{MORE} - {LESS}, paired by seed** (percentage points of "
            "test accuracy: the mean difference of the runs of one seed, "
            f"[its {CONFIDENCE:.0%} t-interval] (number of pairs); an "
            "interval that excludes 0 is a difference these seeds "
            "resolve):\n\n" + markdown_table(
                ("sampling", *rest_fields, *[f"V={g}" for g in columns]),
                rows) + "\n")
    losses = group_losses(points)
    if losses:
        rows = [(norm, micro_sampling_text(sampling), *[v for _, v in rest],
                 f"{large} → {small}", interval_text(differences.values()))
                for (norm, sampling, rest), small, large, differences
                in losses]
        text += (
            "\n**Accuracy lost as the groups shrink** (test accuracy at the "
            "largest V minus at the smallest, paired by seed, percentage "
            f"points, [{CONFIDENCE:.0%} t-interval] (pairs)):\n\n"
            + markdown_table(("norm", "sampling", *rest_fields, "V",
                              "lost"), rows) + "\n")
    return text
