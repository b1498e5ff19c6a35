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
                               renorm's warm-up ends; where some runs were
                               also validated in training mode (train.py's
                               val_*_train_mode columns), a panel of the
                               train/inference gap, val_accuracy -
                               val_accuracy_train_mode (runs without them
                               are left out of that panel)
  PLOTS/seconds_per_epoch.png  a bar per group: median training s/epoch,
                               every epoch a dot, the ratio to batchnorm
  PLOTS/timing.md              per group: test accuracy (last weights, and
                               best-val weights where recorded), best and
                               final val accuracy, median s/epoch, ratio to
                               batchnorm, the code the runs ran (also
                               printed)
and, for each run with a NAME.corrections.csv (renorm, train.py
--track-corrections):
  PLOTS/NAME.corrections.png   r_dev, d_dev, r_clipped and d_clipped as
                               heatmaps, a row per layer, a column per
                               epoch, and the bounds after each epoch
                               (experiment.corrections_figure)
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
and, where some runs have virtual batches or pairs sampling (train.py
--virtual-batch-size, --sampling pairs; sweep.py --study microbatch):
  PLOTS/microbatch.png         test accuracy (last weights) against the
                               normalization group V (the batch size where
                               none was set), a line per norm (solid:
                               i.i.d., dashed: pairs), mean and 95%
                               t-interval over seeds; and the accuracy each
                               norm loses from the largest V to the
                               smallest, paired by seed, with its interval
  tables in timing.md          test accuracy per norm, sampling and V (mean
                               ± std (n)); renorm - batchnorm per V and
                               sampling, paired by seed, with its 95%
                               interval; the accuracy lost

Figure titles state every setting that departs from the protocol the runs
name (and the full data set), and the device. A group whose runs come from
different commits, a dirty tree or code that recorded no provenance is
flagged on stderr and in timing.md.

With --readme FILE, the table also replaces what FILE holds between the
lines `<!-- timing.md begins -->` and `<!-- timing.md ends -->`, so that the
README's figures are the ones the histories give.

and, where some runs were validated in training mode too (train.py
--train-mode-validation):
  tables in timing.md          per norm, V, sampling and any other setting
                               that differs: test accuracy, the gap
                               val_accuracy - val_accuracy_train_mode (last
                               epoch, and mean over the epochs) with 95%
                               t-intervals over seeds, renorm's last-epoch
                               corrections; renorm - batchnorm paired by
                               seed (experiment.gap_study)

A partial or malformed history is skipped with a warning naming it; a
malformed NAME.corrections.csv too (its run is kept, without that figure).
"""

import argparse
import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import (
    LogLocator, MaxNLocator, NullLocator, StrMethodFormatter)

from experiment import corrections_figure
from experiment import gap_study
from experiment import runfiles
from experiment.histories import (
    GAP, IGNORED, Point, field_text, group_runs, has_microbatch, has_sweep,
    history_paths, load_runs, micro_points, norm_rank, sampling_text,
    sort_key, sweep_points)
from experiment.protocols import NORMS  # fixes their colours
from experiment.report import (
    CONFIDENCE, figure_title, group_losses, median_seconds, micro_lines,
    micro_sampling_text, microbatch_tables, ratios_to_baseline, sweep_table,
    t_interval, test_table, timing_report, warn_provenance)

PROG = "plot.py"


LINESTYLES = ("-", "--", ":", "-.")
README_BEGIN = "<!-- timing.md begins -->"
README_END = "<!-- timing.md ends -->"


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


# ----------------------------------------------------------- the curves
# The panels of a row of curves: (column, title, scale).
PANELS = (("loss", "train loss", 1), ("val_loss", "validation loss", 1),
          ("accuracy", "train accuracy (%)", 100),
          ("val_accuracy", "validation accuracy (%)", 100))
# The panel beside them where some runs have training-mode validation.
GAP_PANEL = (GAP, ("train/inference gap (points):\nval accuracy − val "
                   "accuracy in training mode"), 100)
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
            ", ".join([group.norm] + [field_text(f, v) for f, v in rest
                                      if v != IGNORED]))
    return styles


def plot_group(ax, group, column, style, scale=1.0):
    """Mean of `column` over the group's runs that have it against epoch,
    with a min–max band where there are several; nothing where none has
    it."""
    runs = [run for run in group.runs if column in run.frame]
    if not runs:
        return
    frame = pd.concat([run.frame[["epoch", column]] for run in runs])
    stats = frame.groupby("epoch")[column].agg(["mean", "min", "max"]) * scale
    color, linestyle, marker, _ = style
    ax.plot(stats.index, stats["mean"], color=color, linestyle=linestyle,
            marker=marker, markersize=4)
    if len(runs) > 1:
        ax.fill_between(stats.index, stats["min"], stats["max"], color=color,
                        alpha=0.2, linewidth=0)


def warmup_epochs(group):
    """Where a renorm group's bounds start to relax, in epochs: its
    warmup_steps over its steps_per_epoch (within the epochs drawn)."""
    last = max(len(run.frame) for run in group.runs)
    return {epoch for run in group.runs
            if (epoch := run.warmup_epoch()) is not None and epoch <= last}


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


def curve_axes(rows, gap=False):
    """The figure and a list of 4 axes (PANELS' order; with `gap`, 5: the
    gap's last) per row: 2 x 2 for one row (the gap a column of its own
    beside them), else a row of panels per facet (shared y per column)."""
    columns = len(PANELS) + gap
    if len(rows) == 1:
        fig, axes = plt.subplots(2, 2 + gap, figsize=(11 + 5 * gap, 8),
                                 sharex=True, sharey="row",
                                 layout="constrained")
        panels = list(axes[:, :2].flat)
        if gap:
            for ax in axes[:, 2]:
                ax.remove()
            panels.append(fig.add_subplot(axes[0, 0].get_gridspec()[:, 2],
                                          sharex=axes[0, 0]))
        return fig, [panels]
    fig, axes = plt.subplots(len(rows), columns,
                             figsize=(17 + 4 * gap, 1.8 + 2.6 * len(rows)),
                             sharex=True, sharey="col", squeeze=False,
                             layout="constrained")
    return fig, [list(row) for row in axes]


def format_curve_axes(grid, rows, specs=PANELS):
    """Titles, log-scaled losses, integer epochs, the gap's zero; each
    row's facet named beside its first panel."""
    for number, (panels, (facet, _)) in enumerate(zip(grid, rows)):
        for ax, (column, title, _) in zip(panels, specs):
            if len(rows) == 1 or number == 0:
                ax.set_title(title)
            if column == GAP:
                ax.axhline(0, color="grey", linewidth=1, zorder=1)
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
            if len(panels) > len(PANELS):
                panels[-1].set_ylabel("percentage points")
        else:
            facet_label = ", ".join(field_text(f, v) for f, v in facet
                                    if v != IGNORED)
            panels[0].set_ylabel(f"{facet_label}\nloss")
            panels[2].set_ylabel("accuracy (%)")
    for ax in grid[-1] if len(rows) > 1 else grid[0][2:]:
        ax.set_xlabel("epoch")


def plot_curves(groups, runs):
    """Train and validation loss and accuracy against epoch: a colour per
    norm; with many groups, a row of panels per value of the fields that
    split them most (facets), so that no panel holds more than MAX_LINES
    lines; renorm's warm-up end marked; the train/inference gap beside
    them where some runs have it."""
    facets = facet_fields(groups)
    rows = facet_rows(groups, facets)
    styles = curve_styles(groups, facets)
    gap = any(run.has_gap for run in runs)
    specs = PANELS + ((GAP_PANEL,) if gap else ())
    fig, grid = curve_axes(rows, gap)
    warmup = False
    for panels, (_, members) in zip(grid, rows):
        for ax, (column, _, scale) in zip(panels, specs):
            for group in members:
                plot_group(ax, group, column, styles[group.label], scale)
            warmup = mark_warmups(ax, members, styles) or warmup
    format_curve_axes(grid, rows, specs)
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
        norm, classes, _rest = line
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


# ------------------------------------------------------ the microbatch study
def micro_linestyle(sampling):
    """Solid for i.i.d., dashed for pairs, dotted for K classes per batch."""
    return {"iid": "-", "pairs": "--"}.get(sampling, ":")


def micro_label(line):
    norm, sampling, rest = line
    return ", ".join([norm, micro_sampling_text(sampling)]
                     + [field_text(f, v) for f, v in rest])


def micro_accuracy(ax, points, colors):
    """Test accuracy against V, a line per norm and sampling: the mean over
    seeds and its t-interval (a line's single group, keras-renorm's whole
    batch, is a marker)."""
    rests = list(dict.fromkeys(p.rest for p in points))
    markers = dict(zip(rests, "osD^v<>px*"))
    lines = micro_lines(points)
    for number, (line, cells) in enumerate(lines.items()):
        groups = [g for g in sorted(cells, key=sort_key)
                  if cells[g].by_seed()]
        if not groups:
            continue
        stats = [t_interval(cells[g].by_seed().values()) for g in groups]
        errors = [half or 0.0 for _, half in stats]
        norm, sampling, rest = line
        # Each line a little to the side (on the log axis), so that the
        # intervals at one V do not hide each other.
        dodge = 2 ** (0.03 * (number - (len(lines) - 1) / 2))
        ax.errorbar([g * dodge for g in groups], [mean for mean, _ in stats],
                    yerr=errors if any(errors) else None,
                    color=colors[norm], linestyle=micro_linestyle(sampling),
                    marker=markers[rest], markersize=5, capsize=3,
                    label=micro_label(line))
    sizes = sorted({p.group for p in points}, key=sort_key)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set(xlabel="normalization group V (examples; log scale)",
           ylabel="test accuracy, last weights (%)",
           title="test accuracy against V")


def micro_losses(ax, points, colors):
    """A bar per norm and sampling: accuracy at the largest V minus at the
    smallest, paired by seed, with its t-interval."""
    losses = group_losses(points)
    for number, (line, _small, _large, differences) in enumerate(losses):
        mean, half = t_interval(differences.values())
        norm, sampling, _ = line
        ax.bar(number, mean, 0.7, color=colors[norm],
               alpha=0.45 if sampling == "iid" else 0.9,
               hatch=None if sampling == "iid" else "//", edgecolor="white",
               yerr=half, capsize=4)
    ax.axhline(0, color="grey", linewidth=1)
    ax.set_xticks(range(len(losses)),
                  [micro_label(line).replace(", ", "\n", 1)
                   for line, *_ in losses], fontsize=8)
    spans = sorted({f"{large} → {small}" for _, small, large, _ in losses})
    ax.set(ylabel="percentage points",
           title="accuracy lost, V " + ", ".join(spans)
           + " (paired by seed)")


def plot_microbatch(points, runs):
    """Test accuracy against the normalization group V, and what each norm
    loses from the largest V to the smallest."""
    losses = group_losses(points)
    fig, axes = plt.subplots(1, 2 if losses else 1, squeeze=False,
                             figsize=(13 if losses else 7, 5.5),
                             layout="constrained")
    colors = norm_colors(list(dict.fromkeys(p.norm for p in points)))
    micro_accuracy(axes[0, 0], points, colors)
    if losses:
        micro_losses(axes[0, 1], points, colors)
    seeds = sorted({len(p.by_seed()) for p in points})
    fig.suptitle(figure_title(
        "Small normalization groups in batches of one size (solid: i.i.d., "
        f"dashed: pairs); mean and {CONFIDENCE:.0%} t-interval over "
        + ("–".join(map(str, (seeds[0], seeds[-1]))) if len(seeds) > 1
           else str(seeds[0])) + " seeds", [], runs))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center",
               ncol=min(len(handles), 3), frameon=False)
    return fig


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
    micro = micro_points(runs) if has_microbatch(runs) else []
    micro_text = microbatch_tables(micro) if micro else ""
    if micro_text:
        report += "\n" + micro_text
    gaps = gap_study.tables(sorted({run.path.parent for run in runs}))
    if gaps:
        report += ("\n### Training and inference outputs, and what r and d "
                   "did\n\n" + gaps)
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
        if micro_text:  # some run has a result
            save_figure(plot_microbatch(micro, runs),
                        args.plots_dir / "microbatch.png")
        for run in runs:
            if run.corrections is not None:
                save_figure(corrections_figure.plot_corrections(run),
                            args.plots_dir / corrections_figure.file_name(run))
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
