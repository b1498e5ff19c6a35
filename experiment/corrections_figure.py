"""The figure of what a renorm run's corrections did, from its
NAME.corrections.csv (train.py --track-corrections): `r_dev` (mean |r - 1|),
`d_dev` (mean |d|), `r_clipped` and `d_clipped` (the fractions of steps,
channels and groups where the bound held r or d) as heatmaps, a row per
BatchRenormalization layer in the model's order, a column per epoch (each
cell the means over that epoch's training steps); under each column of
heatmaps, its bound (r_max, d_max) after each epoch; a dotted line where the
warm-up ends (r = 1, d = 0: every step clipped unless the batch statistics
equal the moving ones). Titled with the run's name, seed and every setting
that departs from its protocol (experiment.report)."""

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from experiment.report import figure_title

# (column, title, colour map, fixed upper end of its scale or None), by
# figure column (r, then d) and row (deviation, then clipped fraction).
HEATMAPS = ((("r_dev", "r_dev: mean |r − 1|", "viridis", None),
             ("r_clipped", "r_clipped: fraction where r is clipped",
              "magma", 1.0)),
            (("d_dev", "d_dev: mean |d|", "viridis", None),
             ("d_clipped", "d_clipped: fraction where d is clipped",
              "magma", 1.0)))
BOUNDS = (("r_max", "r_max after the epoch"), ("d_max", "d_max after the epoch"))
WARMUP_STYLE = (0, (1, 2))  # as the curves mark it
MAX_EPOCH_TICKS = 10


def file_name(run):
    """The figure's file in the plots folder: NAME.corrections.png, beside
    the curves as NAME.corrections.csv is beside NAME.csv."""
    return f"{run.name}.corrections.png"


def epoch_grid(corrections):
    """The epochs of the columns (every integer from the first epoch to the
    last: an epoch without rows is a blank column) and the layers of the
    rows, in the file's order."""
    epochs = corrections["epoch"].round().astype(int)
    return (np.arange(epochs.min(), epochs.max() + 1),
            list(dict.fromkeys(corrections["layer"])))


def matrix(corrections, column, epochs, layers):
    """`column` as a layers x epochs array (NaN where there is no row)."""
    table = corrections.assign(epoch=corrections["epoch"].round().astype(int))
    return (table.pivot(index="layer", columns="epoch", values=column)
            .reindex(index=layers, columns=epochs).to_numpy(dtype=float))


def epoch_ticks(ax, epochs):
    """Integer epochs under the cells' centres (a cell spans its epoch's
    training, from e - 1 to e), at most MAX_EPOCH_TICKS of them."""
    first, last = int(epochs[0]), int(epochs[-1])
    ticks = [int(t) for t in MaxNLocator(MAX_EPOCH_TICKS, integer=True,
                                         min_n_ticks=1).tick_values(first,
                                                                    last)
             if first <= t <= last]
    ax.set_xticks([t - 0.5 for t in ticks], [str(t) for t in ticks])
    ax.set_xlim(first - 1, last)


def heatmap(fig, ax, values, spec, epochs, layers):
    """One statistic, a colour bar beside it (from 0; fractions to 1)."""
    _column, title, cmap, top = spec
    finite = values[np.isfinite(values)]
    high = top if top is not None else (
        float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
    # Grey: no row for that layer and epoch.
    colours = plt.get_cmap(cmap).with_extremes(bad="0.85")
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


def bound_panel(ax, corrections, column, title, epochs):
    """A bound after each epoch (the same for every layer), at the
    centre of its epoch's cells."""
    bound = corrections.groupby("epoch")[column].first()
    ax.plot(bound.index - 0.5, bound.to_numpy(), color="0.2",
            marker="o" if len(epochs) <= 25 else None, markersize=3)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")


def mark_warmup(axes, run, epochs):
    """A dotted line where the run's warm-up ends, on every panel; whether
    drawn (not where it ends outside the epochs drawn)."""
    epoch = run.warmup_epoch()
    if epoch is None or not epochs[0] - 1 < epoch <= epochs[-1]:
        return False
    for ax in axes:
        ax.axvline(epoch, color="white" if ax.images else "grey",
                   linestyle=WARMUP_STYLE, linewidth=1.3)
    return True


def plot_corrections(run):
    """The run's four statistics as heatmaps (layer by epoch) and its
    bounds; `run.corrections` must be a frame of them (histories)."""
    corrections = run.corrections
    epochs, layers = epoch_grid(corrections)
    height = 0.9 + 0.24 * len(layers)
    fig, axes = plt.subplots(
        3, 2, figsize=(14, 2 * height + 3.2), sharex="col",
        height_ratios=(height, height, 1.4), layout="constrained")
    for row in range(2):  # the layers; the bounds have scales of their own
        axes[row, 1].sharey(axes[row, 0])
    for number, (maps, (bound, bound_title)) in enumerate(zip(HEATMAPS,
                                                             BOUNDS)):
        for row, spec in enumerate(maps):
            heatmap(fig, axes[row, number], matrix(corrections, spec[0],
                                                   epochs, layers),
                    spec, epochs, layers)
        bound_panel(axes[2, number], corrections, bound, bound_title, epochs)
        epoch_ticks(axes[2, number], epochs)
    for ax in axes[:2, 1]:
        ax.tick_params(labelleft=False)
    warmup = mark_warmup(axes.flat, run, epochs)
    seed = run.value("seed")
    fig.suptitle(figure_title(
        f"What renorm's corrections did, by layer and epoch: {run.name} "
        f"(seed {seed}); means over each epoch's training steps"
        + ("; dotted: the warm-up ends" if warmup else ""), [], [run]),
        fontsize=11)
    return fig
