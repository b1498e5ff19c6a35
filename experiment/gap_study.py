"""The corrections study (docs/sweep.md): NAME.corrections.png, renorm's r
and d by layer and epoch, and timing.md's tables of the train/inference gap
and the corrections per cell (norm, V, sampling, renorm variant)."""

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from experiment.histories import GAP, group_size, test_result
from experiment.report import (
    BASELINE, WARMUP_STYLE, figure_title, interval_text, markdown_table,
    mean_std_text, paired_text, value_text)

CORRECTIONS = ("r_dev", "d_dev", "r_clipped", "d_clipped")
# Settings that make a cell, besides norm, V and sampling (a variant).
VARIANT_KEYS = ("norm_momentum", "renorm_schedule", "r_max", "d_max")


def figures(runs, groups):
    for run in runs:
        if run.corrections is not None:
            yield f"{run.name}.corrections.png", plot_corrections(run)


# Each heatmap's title and colour bar's top (None: its largest value), in
# CORRECTIONS' order: rows dev, clipped; columns r, d.
HEATMAPS = (("mean |r − 1|", None), ("mean |d|", None),
            ("fraction where r is clipped", 1.0),
            ("fraction where d is clipped", 1.0))
MAX_EPOCH_TICKS = 10


def bound_panel(ax, corrections, x, epochs):
    """`x`_max after each epoch (every layer's); at most MAX_EPOCH_TICKS
    epochs, under the cells' centres (a cell spans its epoch's training,
    from e - 1 to e)."""
    bound = corrections.groupby("epoch")[f"{x}_max"].first()
    ax.plot(bound.index - 0.5, bound.to_numpy(), color="0.2",
            marker="o" if len(epochs) <= 25 else None, markersize=3)
    ax.set_title(f"{x}_max after the epoch", fontsize=10)
    ax.set_xlabel("epoch")
    first, last = int(epochs[0]), int(epochs[-1])
    locator = MaxNLocator(MAX_EPOCH_TICKS, integer=True, min_n_ticks=1)
    ticks = [int(t) for t in locator.tick_values(first, last)
             if first <= t <= last]
    ax.set_xticks([t - 0.5 for t in ticks], [str(t) for t in ticks])
    ax.set_xlim(first - 1, last)


def heatmap(fig, ax, corrections, column, title, top, epochs, layers):
    """One statistic, layer by epoch, a colour bar from 0 to `top` (None:
    its largest value)."""
    values = (corrections.pivot(index="layer", columns="epoch", values=column)
              .reindex(index=layers, columns=epochs).to_numpy(dtype=float))
    finite = values[np.isfinite(values)]
    high = top if top is not None else (
        float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
    # Grey: no row for that layer and epoch.
    colours = plt.get_cmap("viridis" if top is None else "magma")
    colours = colours.with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=colours,
                      aspect="auto", interpolation="nearest", vmin=0,
                      vmax=high, extent=(epochs[0] - 1, epochs[-1],
                                         len(layers) - 0.5, -0.5))
    ax.set_title(title, fontsize=10)
    ax.grid(False)
    ax.set_yticks(range(len(layers)), layers,
                  fontsize=9 if len(layers) <= 20 else 7)
    fig.colorbar(image, ax=ax, pad=0.01, fraction=0.05,
                 label="fraction" if top == 1.0 else None)


def mark_warmup(axes, run, epochs):
    """A dotted line where the run's warm-up ends, if drawn; whether."""
    epoch = run.warmup_epoch()
    if epoch is None or not epochs[0] - 1 < epoch <= epochs[-1]:
        return False
    for ax in axes:
        ax.axvline(epoch, color="white" if ax.images else "grey",
                   linestyle=WARMUP_STYLE, linewidth=1.3)
    return True


def plot_corrections(run):
    """The run's four statistics as heatmaps (layer by epoch), its bounds."""
    corrections = run.corrections.assign(
        epoch=run.corrections["epoch"].round().astype(int))
    epochs = np.arange(corrections["epoch"].min(),
                       corrections["epoch"].max() + 1)
    layers = list(dict.fromkeys(corrections["layer"]))
    height = 0.9 + 0.24 * len(layers)
    fig, axes = plt.subplots(
        3, 2, figsize=(14, 2 * height + 3.2), sharex="col",
        height_ratios=(height, height, 1.4), layout="constrained")
    for row in range(2):  # the layers; the bounds have scales of their own
        axes[row, 1].sharey(axes[row, 0])
    for ax, column, (title, top) in zip(axes[:2].flat, CORRECTIONS,
                                        HEATMAPS):
        heatmap(fig, ax, corrections, column, f"{column}: {title}", top,
                epochs, layers)
    for ax, x in zip(axes[2], "rd"):
        bound_panel(ax, corrections, x, epochs)
    for ax in axes[:2, 1]:
        ax.tick_params(labelleft=False)
    warmup = mark_warmup(axes.flat, run, epochs)
    fig.suptitle(figure_title(
        f"What renorm's corrections did, by layer and epoch: {run.name} "
        f"(seed {run.value('seed')}); means over each epoch's training steps"
        + ("; dotted: the warm-up ends" if warmup else ""), [], [run]),
        fontsize=11)
    return fig


# ------------------------------------------------------------------ tables
def tables(runs, groups):
    """timing.md's section of the study; "" without runs of it."""
    studied = [run for run in runs if in_study(run)]
    if not studied:
        return ""
    folders = sorted({run.path.parent for run in studied})
    table = cells(studied)
    return ("\n### Training and inference outputs, and what r and d did"
            "\n\n" + cell_table(table) + "\n\n" + paired_table(table)
            + "\n\nMeans over seeds: `mean ± sd (n)` or `mean [95% "
            "t-interval] (n)`; the corrections: the last epoch's means over "
            "the layers and seeds (fractions). Written by "
            "`experiment/gap_study.py` from "
            + ", ".join(f"`{d}`" for d in folders) + ".\n")


def in_study(run):
    """Whether a run has finished, validated in training mode each epoch."""
    epochs = run.config["epochs"]
    return bool(run.config["train_mode_validation"] and GAP in run.frame
                and run.frame[GAP].notna().all()
                and isinstance(epochs, int) and len(run.frame) >= epochs)


def cell_of(config, variants):
    """(norm, V, sampling, the text of the `variants` keys) of a run."""
    variant = ", ".join(f"{key} {value_text(config[key])}"
                        for key in variants)
    return config["norm"], group_size(config), config["sampling"], variant


def measures(run):
    """Test accuracy and gaps (points), the last epoch's mean corrections."""
    gaps = [100 * gap for gap in run.frame[GAP]]
    test = test_result(run)
    result = {"test": float("nan") if test is None else 100 * test,
              "gap_last": gaps[-1], "gap_mean": sum(gaps) / len(gaps)}
    last = (run.corrections[run.corrections["epoch"]
                            == run.frame["epoch"].iloc[-1]]
            if run.corrections is not None else ())
    return result | {key: sum(last[key]) / len(last) if len(last) else None
                     for key in CORRECTIONS}


def cells(runs):
    """{cell: {measure: {seed: value}}} (`measures`), cells in a stable
    order."""
    varying = [key for key in VARIANT_KEYS
               if len({value_text(r.config[key]) for r in runs
                       if r.config["norm"] == "renorm"}) > 1]
    table = {}
    for run in sorted(runs, key=lambda r: (r.config["norm"],
                                           cell_of(r.config, varying))):
        own = varying if run.config["norm"] == "renorm" else []
        cell = table.setdefault(cell_of(run.config, own), {})
        for key, value in measures(run).items():
            cell.setdefault(key, {})[run.config["seed"]] = value
    return table


def cell_table(table):
    """Markdown: a row per cell, its means over seeds."""
    texts = (mean_std_text, interval_text, interval_text, *[mean_text] * 4)
    return markdown_table(
        ("norm", "V", "sampling", "variant", "test acc (%)",
         "gap, last epoch (points)", "gap, mean over epochs", "r_dev",
         "d_dev", "r clipped", "d clipped"),
        [(norm, str(group), sampling, variant or "–",
          *[text(by_seed.values())
            for text, by_seed in zip(texts, measured.values())])
         for (norm, group, sampling, variant), measured in table.items()])


def paired_table(table):
    """Markdown: renorm - batchnorm of the same V and sampling, by seed."""
    rows = [("", str(group), sampling, variant or "–",
             *[paired_text(measured[key],
                           table[BASELINE, group, sampling, ""][key])
               for key in ("test", "gap_last")])
            for (norm, group, sampling, variant), measured in table.items()
            if norm == "renorm" and (BASELINE, group, sampling, "") in table]
    return markdown_table(("renorm - batchnorm", "V", "sampling", "variant",
                           "test acc (points)", "gap, last epoch (points)"),
                          rows)


def mean_text(values):
    values = [v for v in values if v is not None]
    return f"{sum(values) / len(values):.3g}" if values else "–"
