"""The microbatch study (docs/sweep.md): microbatch.png, tables by V."""

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
    mean_std_text, paired_differences, paired_text, section, t_interval)
from experiment.sweep_study import interval_lines, styles_of

LESS, MORE = BASELINE, "renorm"  # the paired difference is MORE - LESS


def figures(runs, groups):
    found = micro_points(runs)
    if any(p.by_seed() for p in found):
        yield "microbatch.png", plot_microbatch(found, runs)


@dataclass
class MicroPoint(histories.Point):
    """x: the normalization group V; sampling: iid, pairs or kK."""

    FIELDS: ClassVar = ("virtual_batch_size", "sampling", "classes_per_batch")

    def by_seed(self):
        """Last weights' test accuracy (%) by seed (mean where repeated)."""
        found = {}
        for run in self.runs:
            value = test_result(run)
            if value is not None:
                found.setdefault(run.value("seed"), []).append(value * 100)
        return {seed: float(np.mean(v)) for seed, v in found.items()}


def micro_points(runs):
    """The MicroPoints, i.i.d. first; none without virtual batches or pairs."""
    if not any(run.value("virtual_batch_size") is not None
               or run.value("sampling") == "pairs" for run in runs):
        return []
    return histories.points(
        runs, MicroPoint,
        lambda run: (run.value("sampling"), group_size(run.config)),
        lambda p: (norm_rank(p.norm), p.sampling != "iid", str(p.sampling),
                   [sort_key(v) for _, v in p.rest], sort_key(p.x)))


def group_losses(points):
    """[(line, smallest V, largest, {seed: at largest - at smallest})]."""
    found = []
    for line, cells in lines(points).items():
        if len(cells) > 1:
            small, large = min(cells, key=sort_key), max(cells, key=sort_key)
            found.append((line, small, large, paired_differences(
                cells[large].by_seed(), cells[small].by_seed())))
    return found


def renorm_gains(points):
    """{(sampling, rest): {V: `paired_text` of MORE - LESS}} where both."""
    by_line, found = lines(points), {}
    for (norm, sampling, rest), cells in by_line.items():
        less = by_line.get((LESS, sampling, rest), {}) if norm == MORE else {}
        for group in cells.keys() & less.keys():
            found.setdefault((sampling, rest), {})[group] = paired_text(
                cells[group].by_seed(), less[group].by_seed())
    return found


def micro_sampling_text(sampling):
    return {"iid": "i.i.d.", "pairs": "pairs"}.get(sampling, sampling)


def tables(runs, groups):
    """Test accuracy by V, `renorm_gains`, `group_losses`; or "" if none."""
    points = micro_points(runs)
    if not any(p.by_seed() for p in points):
        return ""
    rest_fields = [f for f, _ in points[0].rest]
    gains, losses = renorm_gains(points), group_losses(points)
    columns = sorted({g for cells in gains.values() for g in cells},
                     key=sort_key)
    gain_rows = [(micro_sampling_text(sampling), *[v for _, v in rest],
                  *[cells.get(g, "–") for g in columns])
                 for (sampling, rest), cells in gains.items()]
    loss_rows = [(norm, micro_sampling_text(sampling), *[v for _, v in rest],
                  f"{large} → {small}", interval_text(differences.values()))
                 for (norm, sampling, rest), small, large, differences
                 in losses]
    interval = f"mean [{CONFIDENCE:.0%} t-interval] (pairs)"
    return section(
        "Test accuracy by normalization group V and sampling",
        "%, the last weights; mean ± std (seeds); V: the virtual batch, else "
        "the whole batch; pairs: batches of same-class pairs, V/2 classes "
        "per group",
        line_table(points, micro_sampling_text, "V={}".format,
                   lambda p: mean_std_text(p.by_seed().values()))) + (
        section(f"{MORE} - {LESS}, paired by seed",
                f"percentage points of test accuracy, {interval}; an "
                "interval excluding 0: a difference these seeds resolve",
                markdown_table(("sampling", *rest_fields,
                                *[f"V={g}" for g in columns]), gain_rows))
        if gains else "") + (
        section("Accuracy lost as the groups shrink",
                "test accuracy at the largest V minus the smallest, paired "
                f"by seed, percentage points, {interval}",
                markdown_table(("norm", "sampling", *rest_fields, "V",
                                "lost"), loss_rows)) if losses else "")


def seed_interval(point):
    """(mean, half, half) of the t-interval over seeds; None without any."""
    if not point.by_seed():
        return None
    mean, half = t_interval(point.by_seed().values())
    return mean, half or 0.0, half or 0.0


def micro_losses(ax, losses, colors):
    """A bar per line of `group_losses`, with its t-interval."""
    for number, (line, _small, _large, differences) in enumerate(losses):
        mean, half = t_interval(differences.values())
        norm, sampling, _ = line
        ax.bar(number, mean, 0.7, color=colors[norm], yerr=half, capsize=4,
               **bar_style(sampling == "iid"))
    ax.axhline(0, color="grey", linewidth=1)
    ax.set_xticks(range(len(losses)), [
        line_label(line, micro_sampling_text).replace(", ", "\n", 1)
        for line, *_ in losses], fontsize=8)
    spans = sorted({f"{large} → {small}" for _, small, large, _ in losses})
    ax.set(ylabel="percentage points",
           title="accuracy lost, V " + ", ".join(spans)
           + " (paired by seed)")


def plot_microbatch(points, runs):
    """Test accuracy against V (mean, t-interval), `micro_losses` beside."""
    losses = group_losses(points)
    fig, axes = plt.subplots(1, 2 if losses else 1, squeeze=False,
                             figsize=(13 if losses else 7, 5.5),
                             layout="constrained")
    colors, _, markers = styles_of(points)
    linestyles = {p.sampling: {"iid": "-", "pairs": "--"}.get(p.sampling, ":")
                  for p in points}  # dotted: K classes per batch
    interval_lines(axes[0, 0], points, seed_interval,
                   (colors, linestyles, markers), micro_sampling_text,
                   spread=0.03)
    log2_axis(axes[0, 0], x_values(points),
              "normalization group V (examples; log scale)")
    axes[0, 0].set(ylabel="test accuracy, last weights (%)",
                   title="test accuracy against V")
    if losses:
        micro_losses(axes[0, 1], losses, colors)
    seeds = sorted({len(p.by_seed()) for p in points})
    fig.suptitle(figure_title(
        "Small normalization groups in batches of one size (solid: i.i.d., "
        f"dashed: pairs); mean and {CONFIDENCE:.0%} t-interval over "
        + "–".join(map(str, dict.fromkeys((seeds[0], seeds[-1]))))
        + " seeds", [], runs))
    legend_below(fig, axes[:1, 0])
    return fig
