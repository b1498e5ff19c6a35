"""The sweep over batch sizes and K classes per batch (sweep.py):
accuracy_vs_batch_size.png, non_iid.png and timing.md's tables."""

from dataclasses import dataclass
from typing import ClassVar

import matplotlib.pyplot as plt
import numpy as np

from experiment import histories
from experiment.histories import (
    field_text, lines, norm_rank, sampling_text, sort_key, test_result,
    x_values)
from experiment.report import (
    LINESTYLES, MAX_LINES, bar_style, figure_title, format_percent,
    legend_below, line_label, line_table, log2_axis, norm_colors,
    rest_markers, test_images_text)


def tables(runs, groups):
    """timing.md's tables of the sweep; "" where the runs are none."""
    found = sweep_points(runs)
    if not found:
        return ""
    tests = test_table(found)
    return ("\n" + tests if tests else "") + "\n" + sweep_table(found)


def figures(runs, groups):
    found = sweep_points(runs)
    if len({p.x for p in found}) > 1:
        yield ("accuracy_vs_batch_size.png",
               plot_accuracy_vs_batch_size(found, runs))
    if any(p.sampling is not None for p in found):
        yield "non_iid.png", plot_non_iid(found, runs)


@dataclass
class Point(histories.Point):
    """x: the batch size; sampling: classes_per_batch (None: i.i.d.)."""

    FIELDS: ClassVar = ("batch_size", "classes_per_batch")

    def values(self, which):
        """Each run's best or final validation accuracy, in percent."""
        column = [run.frame["val_accuracy"] for run in self.runs]
        return np.array([c.max() if which == "best" else c.iloc[-1]
                         for c in column]) * 100

    def test_values(self, key="test_accuracy"):
        """Each run's `result[key]` in percent; None where a run has none."""
        results = [test_result(run, key) for run in self.runs]
        if any(r is None for r in results):
            return None
        return np.array(results) * 100


def sweep_points(runs):
    """The Points, i.i.d. first; none unless the runs span several batch
    sizes or include non-i.i.d. ones."""
    if (len({run.value("batch_size") for run in runs}) == 1
            and all(run.value("classes_per_batch") is None for run in runs)):
        return []
    return histories.points(
        runs, Point, lambda run: (run.value("classes_per_batch"),
                                  run.value("batch_size")),
        lambda p: (norm_rank(p.norm), sort_key(p.sampling),
                   [sort_key(v) for _, v in p.rest], sort_key(p.x)))


def sampling_styles(points):
    """Line style per sampling (solid for i.i.d.) and marker per rest."""
    non_iid = sorted({p.sampling for p in points} - {None}, key=sort_key)
    return ({None: "-", **{c: LINESTYLES[1 + i % (len(LINESTYLES) - 1)]
                           for i, c in enumerate(non_iid)}},
            rest_markers(points))


def accuracy_panels(points):
    """(title, accuracy(point)) of each panel: test accuracy where every
    run has it, best and final validation."""
    panels = []
    if all(p.test_values() is not None for p in points):
        panels.append(("test accuracy (last weights)", Point.test_values))
    return panels + [("best validation accuracy",
                      lambda p: p.values("best")),
                     ("final validation accuracy",
                      lambda p: p.values("final"))]


def rest_rows(points):
    """[(rest, points)]: one row, or one per rest where a panel would hold
    more than MAX_LINES lines."""
    if len({p.line for p in points}) <= MAX_LINES:
        return [((), points)]
    rests = list(dict.fromkeys(p.rest for p in points))
    return [(rest, [p for p in points if p.rest == rest]) for rest in rests]


def label(line):
    return line_label(line, sampling_text)


def accuracy_lines(ax, points, accuracy, styles):
    """A line per norm, sampling and rest against batch size, min–max
    bars."""
    colors, linestyles, markers = styles
    for line, cells in lines(points).items():
        values = [accuracy(p) for p in cells.values()]
        mean = np.array([v.mean() for v in values])
        errors = np.array([[v.mean() - v.min() for v in values],
                           [v.max() - v.mean() for v in values]])
        norm, classes, rest = line
        ax.errorbar(list(cells), mean, yerr=errors if errors.any() else None,
                    color=colors[norm], linestyle=linestyles[classes],
                    marker=markers[rest], markersize=5, capsize=3,
                    label=label(line))


def plot_accuracy_vs_batch_size(points, runs):
    """Accuracy against batch size, a panel per measure, a row per
    `rest_rows`."""
    panels, rows = accuracy_panels(points), rest_rows(points)
    fig, axes = plt.subplots(
        len(rows), len(panels), squeeze=False, sharey=True,
        figsize=(5.5 * len(panels), 1.5 + 3.8 * len(rows)),
        layout="constrained")
    styles = (norm_colors(list(dict.fromkeys(p.norm for p in points))),
              *sampling_styles(points))
    for number, (rest, members) in enumerate(rows):
        for ax, (title, accuracy) in zip(axes[number], panels):
            accuracy_lines(ax, members, accuracy, styles)
            log2_axis(ax, x_values(points), "batch size (log scale)")
            ax.set_title(", ".join([title] + [field_text(f, v)
                                              for f, v in rest]))
        axes[number, 0].set_ylabel("accuracy (%)")
    several = any(len(p.runs) > 1 for p in points)
    fig.suptitle(figure_title(
        "Accuracy against batch size (solid: i.i.d. batches, dashed: K "
        "classes per batch)" + ("; bars: min–max over runs" if several
                                else ""), [], runs))
    legend_below(fig, axes.flat)
    return fig


def non_iid_bars(ax, points, colors, sizes):
    """Bars of best val accuracy per batch size, norm and sampling."""
    bars = lines(points)
    width = 0.8 / len(bars)
    for number, (line, members) in enumerate(bars.items()):
        x = [sizes.index(b) - 0.4 + (number + 0.5) * width for b in members]
        heights = [p.values("best").mean() for p in members.values()]
        ax.bar(x, heights, width, color=colors[line[0]], label=label(line),
               **bar_style(line[1] is None))
    ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
    ax.set(xlabel="batch size", ylabel="best validation accuracy (%)")


def non_iid_drops(ax, points, colors, styles, sizes):
    """Per norm and K: best val accuracy with K classes per batch minus
    i.i.d., against batch size."""
    linestyles, markers = styles
    drawn = False
    found = lines(points)
    for (norm, classes, rest), cells in found.items():
        iid = found.get((norm, None, rest), {})
        members = [size for size in cells if size in iid]
        if classes is None or not members:
            continue
        drops = [cells[size].values("best").mean()
                 - iid[size].values("best").mean() for size in members]
        ax.plot(members, drops, color=colors[norm],
                linestyle=linestyles[classes], marker=markers[rest],
                label=label((norm, classes, rest)))
        drawn = True
    ax.axhline(0, color="grey", linewidth=1)
    if drawn:
        log2_axis(ax, sizes, "batch size (log scale)")
    ax.set(ylabel="percentage points")


def plot_non_iid(points, runs):
    """`non_iid_bars` and `non_iid_drops`, a row per `rest_rows`."""
    rows = rest_rows(points)
    fig, axes = plt.subplots(len(rows), 2, figsize=(13, 1.5 + 3.8 * len(rows)),
                             squeeze=False, layout="constrained")
    colors = norm_colors(list(dict.fromkeys(p.norm for p in points)))
    styles = sampling_styles(points)
    for (rest, members), (left, right) in zip(rows, axes):
        where = "".join(", " + field_text(f, v) for f, v in rest)
        non_iid_bars(left, members, colors, x_values(points))
        left.set_title("i.i.d. (light) and non-i.i.d. (hatched) batches"
                       + where)
        non_iid_drops(right, members, colors, styles, x_values(points))
        right.set_title("best val accuracy: non-i.i.d. minus i.i.d." + where)
    fig.suptitle(figure_title("Non-i.i.d. minibatches", [], runs))
    legend_below(fig, axes[:, 0])
    return fig


def sweep_table(points):
    """Markdown: best / final val accuracy (%) per line and batch size."""
    def cell(point):
        return " / ".join(format_percent(point.values(which) / 100)
                          for which in ("best", "final"))

    return (
        "**Validation accuracy by batch size and sampling** (best / final, %; "
        "mean ± std over runs where there are several; i.i.d.: random "
        "batches, K classes/batch: every training batch from K classes, "
        "`--classes-per-batch`):\n\n"
        + line_table(points, sampling_text, "batch {}".format, cell) + "\n")


def test_table(points):
    """Markdown: test accuracy per line and batch size, the last (/ the
    best-val) weights'; "" unless every run has one."""
    if any(p.test_values() is None for p in points):
        return ""
    counted = test_images_text([r for p in points for r in p.runs],
                               "the test set")
    best = all(p.test_values("best_test_accuracy") is not None
               for p in points)

    def cell(point):
        return " / ".join(format_percent(point.test_values(key) / 100) for key
                          in ("test_accuracy", "best_test_accuracy")[:1 + best])

    weights = ("the last / the best-val weights" if best
               else "the last weights")
    return (
        f"**Test accuracy by batch size and sampling** (%, {weights} on "
        f"{counted}; mean ± std over runs where there are several):\n\n"
        + line_table(points, sampling_text, "batch {}".format, cell) + "\n")


