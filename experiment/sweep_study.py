"""The batch study (docs/sweep.md): accuracy_vs_batch_size.png, non_iid.png."""

from dataclasses import dataclass
from functools import partial
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
    section, test_images_text)

# Each panel of accuracy_vs_batch_size.png: its title, what `values` gives.
PANELS = (("test accuracy (last weights)", "test_accuracy"),
          ("best validation accuracy", "best"),
          ("final validation accuracy", "final"))


def tables(runs, groups):
    """Test (where every run has it), best / final val accuracy tables."""
    found = sweep_points(runs)
    if not found:
        return ""
    text, several = "", "mean ± std over runs where there are several"
    if all(p.values("test_accuracy") is not None for p in found):
        keys = [key for key in ("test_accuracy", "best_test_accuracy")
                if all(p.values(key) is not None for p in found)]
        weights = " / ".join(("the last", "the best-val")[:len(keys)])
        counted = test_images_text([r for p in found for r in p.runs],
                                   "the test set")
        text = accuracy_table(
            found, "Test accuracy by batch size and sampling",
            f"%, {weights} weights on {counted}; {several}", keys)
    return text + accuracy_table(
        found, "Validation accuracy by batch size and sampling",
        f"best / final, %; {several}; i.i.d.: random batches, K "
        "classes/batch: every training batch from K classes, "
        "`--classes-per-batch`", ("best", "final"))


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
        """% by run: best/final val accuracy, or `result[which]` (or None)."""
        if which in ("best", "final"):
            return np.array([
                c.max() if which == "best" else c.iloc[-1]
                for c in (run.frame["val_accuracy"] for run in self.runs)
            ]) * 100
        results = [test_result(run, which) for run in self.runs]
        return None if None in results else np.array(results) * 100


def sweep_points(runs):
    """The Points, i.i.d. first; none unless batch sizes or sampling vary."""
    if (len({run.value("batch_size") for run in runs}) == 1
            and all(run.value("classes_per_batch") is None for run in runs)):
        return []
    return histories.points(
        runs, Point, lambda run: (run.value("classes_per_batch"),
                                  run.value("batch_size")),
        lambda p: (norm_rank(p.norm), sort_key(p.sampling),
                   [sort_key(v) for _, v in p.rest], sort_key(p.x)))


def styles_of(points):
    """Colour per norm, line style per sampling (-: i.i.d.), marker per rest."""
    non_iid = sorted({p.sampling for p in points} - {None}, key=sort_key)
    return (norm_colors(list(dict.fromkeys(p.norm for p in points))),
            {None: "-", **{c: LINESTYLES[1 + i % (len(LINESTYLES) - 1)]
                           for i, c in enumerate(non_iid)}},
            dict(zip(dict.fromkeys(p.rest for p in points), "osD^v<>px*")))


def rest_rows(points):
    """[(rest, points)]: one row, or one per rest if over MAX_LINES lines."""
    if len({p.line for p in points}) <= MAX_LINES:
        return [((), points)]
    return [(rest, [p for p in points if p.rest == rest])
            for rest in dict.fromkeys(p.rest for p in points)]


def interval_lines(ax, points, interval, styles, words, spread=0.0):
    """A line per norm, sampling and rest of `interval(point)` (mean, below,
    above; or None), `spread` (log2) apart so that bars do not overlap."""
    colors, linestyles, markers = styles
    found = lines(points)
    for number, (line, cells) in enumerate(found.items()):
        drawn = {x: interval(p) for x, p in cells.items()}
        drawn = {x: value for x, value in drawn.items() if value is not None}
        if not drawn:
            continue
        mean, below, above = np.array(list(drawn.values())).T
        dodge = 2 ** (spread * (number - (len(found) - 1) / 2))
        norm, sampling, rest = line
        ax.errorbar([x * dodge for x in drawn], mean,
                    yerr=[below, above] if below.any() or above.any()
                    else None, color=colors[norm],
                    linestyle=linestyles[sampling], marker=markers[rest],
                    markersize=5, capsize=3, label=line_label(line, words))


def min_max(values):
    return values.mean(), values.mean() - values.min(), (values.max()
                                                         - values.mean())


def rest_figure(points, runs, title, panels, width, ylabel, legend,
                **shared):
    """A row per `rest_rows`, `panel(ax, points, styles, sizes, where)`s."""
    rows = rest_rows(points)
    fig, axes = plt.subplots(len(rows), len(panels), squeeze=False,
                             figsize=(width, 1.5 + 3.8 * len(rows)),
                             layout="constrained", **shared)
    styles = styles_of(points)
    for (rest, members), row in zip(rows, axes):
        where = "".join(", " + field_text(f, v) for f, v in rest)
        for ax, panel in zip(row, panels):
            panel(ax, members, styles, x_values(points), where)
        row[0].set_ylabel(ylabel)
    fig.suptitle(figure_title(title, [], runs))
    legend_below(fig, axes[:, :legend].flat)
    return fig


def measure_panel(title, which, ax, points, styles, sizes, where):
    """`values(which)` against batch size, min–max bars."""
    interval_lines(ax, points, lambda p: min_max(p.values(which)), styles,
                   sampling_text)
    log2_axis(ax, sizes, "batch size (log scale)")
    ax.set_title(title + where)


def plot_accuracy_vs_batch_size(points, runs):
    """A panel per measure (PANELS), a row per `rest_rows`."""
    panels = [partial(measure_panel, title, which) for title, which in PANELS
              if which != "test_accuracy"
              or all(p.values(which) is not None for p in points)]
    several = any(len(p.runs) > 1 for p in points)
    return rest_figure(
        points, runs, "Accuracy against batch size (solid: i.i.d. batches, "
        "dashed: K classes per batch)" + ("; bars: min–max over runs"
                                          if several else ""),
        panels, 5.5 * len(panels), "accuracy (%)", len(panels), sharey=True)


def non_iid_bars(ax, points, styles, sizes, where):
    """Bars of best val accuracy per batch size, norm and sampling."""
    colors = styles[0]
    bars = lines(points)
    width = 0.8 / len(bars)
    for number, (line, members) in enumerate(bars.items()):
        x = [sizes.index(b) - 0.4 + (number + 0.5) * width for b in members]
        heights = [p.values("best").mean() for p in members.values()]
        ax.bar(x, heights, width, color=colors[line[0]],
               label=line_label(line, sampling_text),
               **bar_style(line[1] is None))
    ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
    ax.set(xlabel="batch size",
           title="i.i.d. (light) and non-i.i.d. (hatched) batches" + where)


def non_iid_drops(ax, points, styles, sizes, where):
    """Best val accuracy with K classes per batch minus i.i.d."""
    colors, linestyles, markers = styles
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
                label=line_label((norm, classes, rest), sampling_text))
    if ax.lines:
        log2_axis(ax, sizes, "batch size (log scale)")
    ax.axhline(0, color="grey", linewidth=1)
    ax.set(ylabel="percentage points",
           title="best val accuracy: non-i.i.d. minus i.i.d." + where)


def plot_non_iid(points, runs):
    """`non_iid_bars` and `non_iid_drops`, a row per `rest_rows`."""
    return rest_figure(points, runs, "Non-i.i.d. minibatches",
                       (non_iid_bars, non_iid_drops), 13,
                       "best validation accuracy (%)", 1)


def accuracy_table(points, title, notes, keys):
    """Markdown: the `values(key)` (%) per line and batch size, " / "."""
    return section(title, notes, line_table(
        points, sampling_text, "batch {}".format,
        lambda p: " / ".join(format_percent(p.values(key) / 100)
                             for key in keys)))
