"""The microbatch study (sweep.py --study microbatch): microbatch.png and
timing.md's tables, by norm, sampling and normalization group V."""

from dataclasses import dataclass
from typing import ClassVar

import matplotlib.pyplot as plt
import numpy as np

from experiment import histories
from experiment.histories import (
    group_size, lines, norm_rank, sort_key, test_result, x_values)
from experiment.report import (
    BASELINE, CONFIDENCE, bar_style, figure_title, interval_text,
    legend_below, line_label, line_table, log2_axis, markdown_table,
    mean_std_text, norm_colors, paired_differences, rest_markers, t_interval)

LESS, MORE = BASELINE, "renorm"  # the paired difference is MORE - LESS


def tables(runs, groups):
    """timing.md's tables of the study; "" without results of it."""
    found = micro_points(runs)
    return "\n" + microbatch_tables(found) if has_results(found) else ""


def figures(runs, groups):
    found = micro_points(runs)
    if has_results(found):
        yield "microbatch.png", plot_microbatch(found, runs)


def has_results(points):
    return any(p.by_seed() for p in points)


@dataclass
class MicroPoint(histories.Point):
    """x: the normalization group V (`group_size`); sampling: iid, pairs or
    kK (classes_per_batch K); seeds pair the cells."""

    FIELDS: ClassVar = ("virtual_batch_size", "sampling", "classes_per_batch")

    @property
    def group(self):
        return self.x

    def by_seed(self):
        """Test accuracy of the last weights (%) by seed, of the runs that
        have one; the mean where a seed repeats."""
        found = {}
        for run in self.runs:
            value = test_result(run)
            if value is not None:
                found.setdefault(run.value("seed"), []).append(value * 100)
        return {seed: float(np.mean(v)) for seed, v in found.items()}


def micro_points(runs):
    """The MicroPoints, i.i.d. first; none unless some run has virtual
    batches or pairs sampling."""
    if not any(run.value("virtual_batch_size") is not None
               or run.value("sampling") == "pairs" for run in runs):
        return []
    return histories.points(
        runs, MicroPoint,
        lambda run: (run.value("sampling"), group_size(run.config)),
        lambda p: (norm_rank(p.norm), p.sampling != "iid", str(p.sampling),
                   [sort_key(v) for _, v in p.rest], sort_key(p.group)))


def group_losses(points):
    """Per line with several groups: (line, smallest, largest, {seed:
    accuracy at the largest - at the smallest}), what the norm loses."""
    found = []
    for line, cells in lines(points).items():
        if len(cells) < 2:
            continue
        small, large = min(cells, key=sort_key), max(cells, key=sort_key)
        found.append((line, small, large, paired_differences(
            cells[large].by_seed(), cells[small].by_seed())))
    return found


def renorm_gains(points):
    """{(sampling, rest): {V: {seed: MORE - LESS}}} of the cells with both."""
    by_line, found = lines(points), {}
    for (norm, sampling, rest), cells in by_line.items():
        baseline = by_line.get((LESS, sampling, rest), {})
        for group, point in cells.items():
            if norm == MORE and group in baseline:
                found.setdefault((sampling, rest), {})[group] = (
                    paired_differences(point.by_seed(),
                                       baseline[group].by_seed()))
    return found


def micro_sampling_text(sampling):
    return {"iid": "i.i.d.", "pairs": "pairs"}.get(sampling, sampling)


def microbatch_tables(points):
    """Markdown: test accuracy per line and V, `gains_table`,
    `losses_table`."""
    rest_fields = [f for f, _ in points[0].rest]
    return (
        "**Test accuracy by normalization group V and sampling** (%, the "
        "last weights; mean ± std (number of seeds); V: the virtual batch, "
        "or the whole batch where none was set; pairs: every batch made of "
        "pairs of images of a class, V/2 distinct classes per group, "
        "`--sampling pairs`):\n\n" + line_table(
            points, micro_sampling_text, "V={}".format,
            lambda p: mean_std_text(p.by_seed().values())) + "\n"
        + gains_table(points, rest_fields) + losses_table(points, rest_fields))


def gains_table(points, rest_fields):
    """Markdown: MORE - LESS paired by seed, per sampling and V."""
    gains = renorm_gains(points)
    if not gains:
        return ""
    columns = sorted({g for cells in gains.values() for g in cells},
                     key=sort_key)
    rows = [(micro_sampling_text(sampling), *[v for _, v in rest],
             *[interval_text(cells[g].values()) if g in cells else "–"
               for g in columns])
            for (sampling, rest), cells in gains.items()]
    return (
        f"\n**{MORE} - {LESS}, paired by seed** (percentage points of "
        "test accuracy: the mean difference of the runs of one seed, "
        f"[its {CONFIDENCE:.0%} t-interval] (number of pairs); an "
        "interval that excludes 0 is a difference these seeds "
        "resolve):\n\n" + markdown_table(
            ("sampling", *rest_fields, *[f"V={g}" for g in columns]),
            rows) + "\n")


def losses_table(points, rest_fields):
    """Markdown: `group_losses` with their t-intervals."""
    losses = group_losses(points)
    if not losses:
        return ""
    rows = [(norm, micro_sampling_text(sampling), *[v for _, v in rest],
             f"{large} → {small}", interval_text(differences.values()))
            for (norm, sampling, rest), small, large, differences in losses]
    return (
        "\n**Accuracy lost as the groups shrink** (test accuracy at the "
        "largest V minus at the smallest, paired by seed, percentage "
        f"points, [{CONFIDENCE:.0%} t-interval] (pairs)):\n\n"
        + markdown_table(("norm", "sampling", *rest_fields, "V", "lost"),
                         rows) + "\n")


def micro_label(line):
    return line_label(line, micro_sampling_text)


def micro_accuracy(ax, points, colors):
    """Test accuracy against V, a line per norm and sampling: the mean over
    seeds and its t-interval."""
    markers = rest_markers(points)
    found = lines(points)
    for number, (line, cells) in enumerate(found.items()):
        groups = [g for g in cells if cells[g].by_seed()]
        if not groups:
            continue
        stats = [t_interval(cells[g].by_seed().values()) for g in groups]
        errors = [half or 0.0 for _, half in stats]
        norm, sampling, rest = line
        # Each line a little to the side (on the log axis), so that the
        # intervals at one V do not hide each other.
        dodge = 2 ** (0.03 * (number - (len(found) - 1) / 2))
        ax.errorbar([g * dodge for g in groups], [mean for mean, _ in stats],
                    yerr=errors if any(errors) else None,
                    color=colors[norm],  # dotted: K classes per batch
                    linestyle={"iid": "-", "pairs": "--"}.get(sampling, ":"),
                    marker=markers[rest], markersize=5, capsize=3,
                    label=micro_label(line))
    log2_axis(ax, x_values(points),
              "normalization group V (examples; log scale)")
    ax.set(ylabel="test accuracy, last weights (%)",
           title="test accuracy against V")


def micro_losses(ax, points, colors):
    """A bar per line of `group_losses`, with its t-interval."""
    losses = group_losses(points)
    for number, (line, _small, _large, differences) in enumerate(losses):
        mean, half = t_interval(differences.values())
        norm, sampling, _ = line
        ax.bar(number, mean, 0.7, color=colors[norm], yerr=half, capsize=4,
               **bar_style(sampling == "iid"))
    ax.axhline(0, color="grey", linewidth=1)
    ax.set_xticks(range(len(losses)),
                  [micro_label(line).replace(", ", "\n", 1)
                   for line, *_ in losses], fontsize=8)
    spans = sorted({f"{large} → {small}" for _, small, large, _ in losses})
    ax.set(ylabel="percentage points",
           title="accuracy lost, V " + ", ".join(spans)
           + " (paired by seed)")


def plot_microbatch(points, runs):
    """`micro_accuracy`, and `micro_losses` beside it where there are."""
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
    legend_below(fig, axes[:1, 0])
    return fig


