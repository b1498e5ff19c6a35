"""The groups of runs: curves.png, seconds_per_epoch.png, timing.md."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import LogLocator, MaxNLocator, StrMethodFormatter

from experiment.histories import (
    GAP, norm_rank, settings_text, sort_key, test_result, warn)
from experiment.report import (
    BASELINE, LINESTYLES, MAX_LINES, WARMUP_STYLE, figure_title,
    format_percent, markdown_table, norm_colors, test_images_text)


def figures(runs, groups):
    yield "curves.png", plot_curves(groups, runs)
    yield "seconds_per_epoch.png", plot_seconds(groups, runs)


# The panels of a row of curves: (column, title, scale).
PANELS = (("loss", "train loss", 1), ("val_loss", "validation loss", 1),
          ("accuracy", "train accuracy (%)", 100),
          ("val_accuracy", "validation accuracy (%)", 100))
# The panel beside them where some runs have training-mode validation.
GAP_PANEL = (GAP, ("train/inference gap (points):\nval accuracy − val "
                   "accuracy in training mode"), 100)


def crowded(groups, facets):
    """Whether a facet's panel would hold > MAX_LINES lines or styles."""
    return any(len(members) > MAX_LINES or len({
        tuple(v for f, v in g.key if f not in facets) for g in members})
        > len(LINESTYLES) for _, members in facet_rows(groups, facets))


def facet_fields(groups):
    """Key fields, a row per value (most values first) until none crowded."""
    fields, facets = [f for f, _ in groups[0].key], []
    while crowded(groups, facets) and len(facets) < len(fields):
        rest = [f for f in fields if f not in facets]
        facets.append(max(rest, key=lambda f: len(
            {dict(g.key)[f] for g in groups})))
    return [f for f in fields if f in facets]  # in label order


def facet_rows(groups, facets):
    """[(facet key, groups)] in the order of the facet fields' values."""
    rows = {}
    for group in groups:
        facet = tuple((f, dict(group.key)[f]) for f in facets)
        rows.setdefault(facet, []).append(group)
    return sorted(rows.items(),
                  key=lambda row: [sort_key(v) for _, v in row[0]])


def curve_styles(groups, facets):
    """{label: (norm's colour, rest's line style, marker, label)}."""
    colors = norm_colors(sorted({g.norm for g in groups}, key=norm_rank))
    rests = [tuple((f, v) for f, v in g.key if f not in facets)
             for g in groups]
    order = list(dict.fromkeys(rests))
    short = max(len(run.frame) for g in groups for run in g.runs) <= 25
    return {g.label: (colors[g.norm],
                      LINESTYLES[order.index(rest) % len(LINESTYLES)],
                      "o" if short else None, settings_text(rest, g.norm))
            for g, rest in zip(groups, rests)}


def plot_group(ax, group, column, style, scale=1.0):
    """Mean of `column` by epoch over the runs with it, a min–max band."""
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


def mark_warmups(ax, groups, styles):
    """A line where each renorm group's warm-up ends; whether any."""
    drawn = False
    for group in groups:
        last = max(len(run.frame) for run in group.runs)
        for epoch in {epoch for run in group.runs if (
                epoch := run.warmup_epoch()) is not None and epoch <= last}:
            ax.axvline(epoch, color=styles[group.label][0],
                       linestyle=WARMUP_STYLE, linewidth=1.3, alpha=0.8)
            drawn = True
    return drawn


def curve_legend(fig, groups, styles, warmup):
    """An entry per line style and colour, and the warm-up's mark."""
    entries = {style[3]: style for style in styles.values()}
    handles = [Line2D([], [], color=c, linestyle=ls, marker=m, markersize=4,
                      label=label) for label, (c, ls, m, _) in entries.items()]
    norms = len({g.norm for g in groups})
    # A column per norm where each has as many entries (the legend fills
    # columns first), the warm-up's mark in a column of its own.
    columns = (norms if len(handles) % norms == 0
               and len(handles) <= 4 * norms else 3)
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
    """The figure and the axes per row, the gap last (one row: 2 x 2)."""
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
    return plt.subplots(len(rows), len(PANELS) + gap,
                        figsize=(17 + 4 * gap, 1.8 + 2.6 * len(rows)),
                        sharex=True, sharey="col", squeeze=False,
                        layout="constrained")


def format_axes(ax, column, title, top):
    """Title (top row), log-scaled losses, integer epochs, the gap's 0."""
    if top:
        ax.set_title(title)
    if column == GAP:
        ax.axhline(0, color="grey", linewidth=1, zorder=1)
    if column.endswith("loss"):
        ax.set_yscale("log")
        ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.yaxis.set_minor_formatter(StrMethodFormatter("{x:g}"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(groups, runs):
    """Loss, accuracy (and gap) by epoch, a row per `facet_fields` value."""
    facets = facet_fields(groups)
    rows = facet_rows(groups, facets)
    styles = curve_styles(groups, facets)
    gap = any(GAP in run.frame for run in runs)
    specs = PANELS + ((GAP_PANEL,) if gap else ())
    fig, grid = curve_axes(rows, gap)
    warmup = False
    for number, (panels, (facet, members)) in enumerate(zip(grid, rows)):
        for ax, (column, title, scale) in zip(panels, specs):
            for group in members:
                plot_group(ax, group, column, styles[group.label], scale)
            warmup = mark_warmups(ax, members, styles) or warmup
            format_axes(ax, column, title, number == 0)
        panels[0].set_ylabel(f"{settings_text(facet)}\nloss"
                             if len(rows) > 1 else "loss")
        panels[2].set_ylabel("accuracy (%)")
        if len(rows) == 1 and gap:
            panels[-1].set_ylabel("percentage points")
    for ax in grid[-1] if len(rows) > 1 else grid[0][2:]:
        ax.set_xlabel("epoch")
    fig.suptitle(figure_title("Training curves" + (
        " (a row per " + ", ".join(facets) + ")" if len(rows) > 1 else ""),
        groups, runs))
    curve_legend(fig, groups, styles, warmup)
    return fig


def plot_seconds(groups, runs):
    """A bar per group: median s/epoch, epochs as dots, ratio to batchnorm."""
    ordered = sorted(groups, key=lambda g: (
        [sort_key(v) for _, v in g.key], norm_rank(g.norm)))
    ratios = dict(zip([g.label for g in groups], ratios_to_baseline(groups)))
    colors = norm_colors(sorted({g.norm for g in groups}, key=norm_rank))
    fig, ax = plt.subplots(figsize=(11, max(4, 2.6 + 0.36 * len(ordered))),
                           layout="constrained")
    longest = max(run.frame["seconds"].max() for run in runs)
    for y, group in enumerate(ordered):
        color, median = colors[group.norm], median_seconds(group)
        ax.barh(y, median, height=0.7, color=color, alpha=0.55)
        later = [s for r in group.runs for s in r.frame["seconds"].iloc[1:]]
        firsts = [run.frame["seconds"].iloc[0] for run in group.runs]
        # A fixed jitter: the same figure from the same histories.
        jitter = np.random.default_rng(y).uniform(-0.2, 0.2, len(later))
        ax.scatter(later, y + jitter, s=10, color=color, zorder=3)
        ax.scatter(firsts, [y] * len(firsts), s=30, facecolors="none",
                   edgecolors=color, zorder=3)
        ratio = ratios[group.label]
        text = f"{median:.2f} s" + ("" if ratio is None else f"  ×{ratio:.2f}")
        ax.text(max([median, *later, *firsts]) + longest * 0.015, y, text,
                va="center", fontsize=9)
        if y and ordered[y - 1].key != group.key:  # a new setting
            ax.axhline(y - 0.5, color="0.8", linewidth=0.8)
    ax.set_yticks(range(len(ordered)), [g.label for g in ordered],
                  fontsize=9)
    ax.set_ylim(len(ordered) - 0.5, -0.5)  # the first group on top
    ax.set_xlim(0, longest * 1.25)
    ax.set_xlabel("training seconds per epoch (evaluation excluded)")
    ax.grid(axis="y", visible=False)
    dot = dict(color="grey", marker="o", linestyle="")
    handles = [Patch(color=colors[n], alpha=0.55, label=f"{n}: median")
               for n in colors] + [
        Line2D([], [], markersize=4, label="an epoch", **dot),
        Line2D([], [], markerfacecolor="none", markersize=6,
               label="first epoch (compiles)", **dot)]
    fig.legend(handles=handles, loc="outside lower center",
               ncol=len(handles), frameon=False)
    fig.suptitle(figure_title("Training seconds per epoch (× = ratio to "
                              "batchnorm)", [], runs))
    return fig



def median_seconds(group):
    """Median training seconds per epoch over all its runs' epochs."""
    return float(pd.concat([run.frame["seconds"] for run in group.runs])
                 .median())


def ratios_to_baseline(groups):
    """Each group's median s/epoch over its batchnorm group's, or None."""
    baseline = {g.key_for(BASELINE): median_seconds(g) for g in groups
                if g.norm == BASELINE}
    return [median_seconds(g) / baseline[g.key_for(BASELINE)]
            if g.key_for(BASELINE) in baseline else None for g in groups]


def format_epochs(group):
    done = sorted({len(run.frame) for run in group.runs})
    text = str(done[0]) if len(done) == 1 else f"{done[0]}–{done[-1]}"
    planned = {run.config["epochs"] for run in group.runs}
    if (len(planned) == 1 and isinstance(epochs := planned.pop(), int)
            and done[0] < epochs):
        text += f"/{epochs}"
    return text


def provenance(group):
    """timing.md's cell (commits, ⚠ problems) and each reason its runs may
    not be the same code: [(in a warning's words, in timing.md's)]."""
    known = [record for run in group.runs
             if isinstance(record := run.config.get("provenance"), dict)]
    commits, total = {r.get("commit") for r in known}, len(group.runs)
    problems = [(kind, text) for kind, text, found in (
        ("with no provenance (older code)", f"{total - len(known)} of {total}"
         " runs without provenance" if known else "no provenance",
         len(known) < total),
        ("of an unknown commit (not run from a git checkout)",
         "commit unknown", None in commits),
        ("from different commits", f"{len(commits - {None})} commits",
         len(commits - {None}) > 1),
        ("from a dirty tree (uncommitted changes)", "dirty tree",
         any(r.get("dirty") is not False for r in known))) if found]
    names = sorted({str(c)[:7] for c in commits if c})
    cell = ", ".join(names[:3] + (["..."] if len(names) > 3 else []))
    if problems:
        cell = ("⚠ " + "; ".join(text for _, text in problems)
                + (f" ({cell})" if cell else ""))
    return cell, problems


def warn_provenance(groups):
    """One warning per kind of problem, naming the groups that have it."""
    flagged = {}
    for group in groups:
        for kind, text in provenance(group)[1]:
            flagged.setdefault(kind, []).append(f"{group.label} ({text})")
    for kind, labels in flagged.items():
        warn(f"{len(labels)} group(s) of runs {kind}; see "
             f"the code column of timing.md: {' | '.join(labels)}")


def result_text(group, key):
    """format_percent of the runs' `result[key]`, "(k of n runs)"."""
    known = [value for run in group.runs
             if (value := test_result(run, key)) is not None]
    if len(known) in (0, len(group.runs)):
        return format_percent(known) if known else "–"
    return f"{format_percent(known)} ({len(known)} of {len(group.runs)} runs)"


def validation_text(runs):
    """Where the runs' validation images come from, in words."""
    pairs = sorted({(str(run.value("val_from")), run.value("val_size"))
                    for run in runs}, key=lambda p: (p[0], sort_key(p[1])))
    return "; ".join(
        ("images" if size is None else f"{size} images")
        + " held out of the training set (never trained on)"
        if source == "train" else ("the whole test set" if size is None
                                   else f"{size} test images")
        + " (as in 2017: not independent of the test accuracy)"
        for source, size in pairs)


BEST_WEIGHTS = "test acc, best-val weights (%)"
# timing.md's columns: (header, cell(group, ratio to batchnorm)).
TIMING_COLUMNS = (
    ("group", lambda g, _: g.label),
    ("runs", lambda g, _: len(g.runs)),
    ("epochs", lambda g, _: format_epochs(g)),
    ("test acc, last weights (%)",
     lambda g, _: result_text(g, "test_accuracy")),
    (BEST_WEIGHTS, lambda g, _: result_text(g, "best_test_accuracy")),
    ("best val acc (%)", lambda g, _: format_percent(
        [r.frame["val_accuracy"].max() for r in g.runs])),
    ("final val acc (%)", lambda g, _: format_percent(
        [r.frame["val_accuracy"].iloc[-1] for r in g.runs])),
    ("median s/epoch", lambda g, _: f"{median_seconds(g):.2f}"),
    ("ratio to batchnorm", lambda _, r: "n/a" if r is None else f"{r:.2f}"),
    ("code", lambda g, _: provenance(g)[0]),
    ("device", lambda g, _: ", ".join(
        sorted({str(r.config["device"]) for r in g.runs}))),
    ("backend", lambda g, _: ", ".join(
        sorted({str(r.config["backend"]) for r in g.runs}))),
)


def tables(runs, groups):
    """timing.md: a row per group; the provenance problems on stderr."""
    warn_provenance(groups)
    best_weights = any(test_result(run, "best_test_accuracy") is not None
                       for run in runs)
    columns = [column for column in TIMING_COLUMNS
               if best_weights or column[0] != BEST_WEIGHTS]
    rows = [[cell(group, ratio) for _, cell in columns]
            for group, ratio in zip(groups, ratios_to_baseline(groups))]
    source = ", ".join(f"`{d}`" for d in sorted({str(run.path.parent)
                                                 for run in runs}))
    best = " (and of its best validation epoch's)" if best_weights else ""
    return (
        f"# Timing\n\n{len(runs)} run(s) from {source}, in {len(groups)} "
        f"group(s).\n\n{markdown_table([c for c, _ in columns], rows)}\n\n"
        f"Accuracies: mean ± std over runs. Test: each run's last weights"
        f"{best} on {test_images_text(runs, 'the whole test set')}. "
        "Validation: each run's best and final epoch, on "
        f"{validation_text(runs)}. Median s/epoch: of an epoch's training "
        "steps (evaluation excluded), over the group's epochs; ratio: to the "
        "batchnorm group of the same other settings. Code: the runs' commit "
        "(⚠: mixed commits, a dirty tree, or no provenance).\n")
