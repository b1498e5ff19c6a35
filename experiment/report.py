"""What the studies share: figure titles (every setting that departs from
the protocol), colours and styles, Markdown tables, t-intervals."""

import io
import math
import textwrap

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import NullLocator

from experiment import runfiles
from experiment.histories import (
    IGNORED, field_text, is_number, lines, sort_key, test_result, x_values)
from experiment.preprocessing import DEFAULT_VAL_SHARE
from experiment.protocols import PROTOCOL_KEYS, PROTOCOLS, SCHEDULE_STEPS
from models import NORMS

BASELINE = "batchnorm"
CONFIDENCE = 0.95
LINESTYLES = ("-", "--", ":", "-.")
WARMUP_STYLE = (0, (1, 2))  # the dotted line where renorm's warm-up ends
MAX_LINES = 8  # lines in one panel; more get a row of panels of their own


def norm_colors(norms):
    """A colour per norm, fixed for those of NORMS."""
    palette = sns.color_palette("colorblind", len(NORMS) + len(norms))
    extra = [n for n in norms if n not in NORMS]
    return {n: palette[NORMS.index(n) if n in NORMS
                       else len(NORMS) + extra.index(n)] for n in norms}


def save_figure(fig, path):
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    runfiles.write_file(path, image.getvalue())


def log2_axis(ax, sizes, label):
    """A log2 x axis with a tick at each of `sizes`."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(label)


def legend_below(fig, axes):
    """One legend under the figure: every line of `axes`, once."""
    handles = {}
    for ax in axes:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(list(handles.values()), list(handles),
               loc="outside lower center", ncol=min(len(handles), 3),
               frameon=False)


def line_label(line, sampling_words):
    norm, sampling, rest = line
    return ", ".join([norm, sampling_words(sampling)]
                     + [field_text(f, v) for f, v in rest])


def bar_style(iid):
    """Light bars for i.i.d. batches, hatched ones for the others."""
    return {"alpha": 0.45 if iid else 0.9, "hatch": None if iid else "//",
            "edgecolor": "white"}


def markdown_table(header, rows):
    widths = [max(len(str(cell)) for cell in column)
              for column in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w)
                                 for c, w in zip(cells, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule] + [line(row) for row in rows])


def section(title, notes, table):
    """A bold title, its notes in brackets, the table (Markdown)."""
    return f"\n**{title}** ({notes}):\n\n{table}\n"


def line_table(points, sampling_words, column, cell):
    """Markdown: a row per line of the points, a column `column(x)` per x
    of cells `cell(point)`."""
    xs = x_values(points)
    header = ("norm", "sampling", *[f for f, _ in points[0].rest],
              *map(column, xs))
    rows = [(norm, sampling_words(sampling), *[v for _, v in rest],
             *[cell(cells[x]) if x in cells else "–" for x in xs])
            for (norm, sampling, rest), cells in lines(points).items()]
    return markdown_table(header, rows)


def format_percent(values):
    """Mean of accuracies in [0, 1] as a percentage, ± std over runs."""
    values = pd.Series(values, dtype=float) * 100
    if len(values) == 1 or values.isna().any():
        return f"{values.mean():.2f}"
    return f"{values.mean():.2f} ± {values.std():.2f}"


def t_interval(values, confidence=CONFIDENCE):
    """The mean of `values` and the half width of its two-sided Student t
    interval (None for fewer than two values)."""
    values = np.asarray(list(values), dtype=float)
    if len(values) < 2:
        return (float(values[0]) if len(values) else math.nan), None
    from scipy import stats

    quantile = stats.t.ppf(1 - (1 - confidence) / 2, len(values) - 1)
    return (float(values.mean()),
            float(quantile * values.std(ddof=1) / math.sqrt(len(values))))


def paired_differences(first, second):
    """{seed: first - second} over the seeds both by-seed dicts have."""
    return {seed: first[seed] - second[seed] for seed in first
            if seed in second}


def paired_text(first, second):
    """`interval_text` of `paired_differences`."""
    return interval_text(paired_differences(first, second).values())


def interval_text(values):
    """`mean [low, high] (n)`, signed, or the mean alone for one value."""
    mean, half = t_interval(values)
    n = len(values)
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


def test_images_text(runs, otherwise):
    """How many test images the runs' test accuracies count."""
    images = {test_result(run, "test_images") for run in runs} - {None}
    return f"all {images.pop()} test images" if len(images) == 1 else otherwise


TRAIN_IMAGES, TEST_IMAGES = 50000, 10000
HELD_OUT = TRAIN_IMAGES // DEFAULT_VAL_SHARE
# A title's words for a protocol key's value (others: "key words {}").
DEPARTURE_TEXT = {
    "epochs": "{} epochs", "batch_size": "batch {}",
    "classes_per_batch": "{} classes/batch", "sgd_momentum": "SGD momentum {}",
    "nesterov": "Nesterov {}", "augment": "augmentation {}",
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


def protocol_departures(config):
    """(key, text) of each protocol key in which a run departs from its
    protocol; the network as one (WRN-d-k); not the steps that
    --renorm-schedule set."""
    name = config.get("protocol")
    if not isinstance(name, str) or name not in PROTOCOLS:
        return [("protocol", f"protocol {name!r} unknown: not compared")]
    protocol, found = PROTOCOLS[name], []
    if (config["depth"], config["width"]) != (protocol.depth, protocol.width):
        found.append(("network", f"WRN-{config['depth']}-{config['width']}"))
    skip = {"depth", "width"} | (set(SCHEDULE_STEPS)
                                 if config["renorm_schedule"] else set())
    for key in PROTOCOL_KEYS:
        reference = getattr(protocol, key)  # JSON has lists for tuples
        if isinstance(reference, tuple):
            reference = list(reference)
        if key not in skip and config[key] != reference:
            text = DEPARTURE_TEXT.get(key, key.replace("_", " ") + " {}")
            found.append((key, text.format(value_text(config[key]))))
    return found


def run_departures(config):
    """`protocol_departures`, the data's, then the run settings'."""
    found = protocol_departures(config)
    train, val = config["train_size"], config["val_size"]
    data = []
    held_out = config["val_from"] == "train"
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
    for key, departs, text in (
            ("precision", lambda v: v != "float32", "precision {}"),
            ("virtual_batch_size", lambda v: v is not None,
             "virtual batch {}"),
            ("sampling", lambda v: v == "pairs",
             "pairs of a class (sampling {})"),
            ("devices", lambda v: v != 1, "{} devices")):
        if departs(config[key]):
            found.append((key, text.format(config[key])))
    return found


def values_text(values):
    """A few values, or their range."""
    values = sorted(set(values), key=sort_key)
    if len(values) > 4 and all(map(is_number, values)):
        return f"{value_text(values[0])}–{value_text(values[-1])}"
    return ", ".join(map(value_text, values))


def setting_text(key, runs):
    """What `key` is in each of `runs`, for a title's "by group" line."""
    if key == "network":
        return "network " + ", ".join(sorted({
            f"WRN-{r.value('depth')}-{r.value('width')}" for r in runs}))
    values = {r.value(key) for r in runs}
    if key in ("classes_per_batch", "virtual_batch_size"):
        return ("sampling " if key == "classes_per_batch"
                else "normalization group ") + ", ".join(
            field_text(key, v) for v in sorted(values, key=sort_key))
    if key == "sampling":
        return "sampling " + ", ".join(sorted(map(str, values)))
    return f"{key.replace('_', ' ')} {values_text(values - {IGNORED})}"


def describe_runs(runs):
    """A title's lines: the protocol and the departures all runs share;
    those that differ between runs; the device."""
    found = [dict(run_departures(run.config)) for run in runs]
    keys = list(dict.fromkeys(k for f in found for k in f))
    common = [k for k in keys if all(f.get(k) == found[0].get(k)
                                     for f in found)]
    protocols = "/".join(sorted({str(r.config["protocol"]) for r in runs}))
    lines = [f"protocol {protocols}" + (
        ", except: " + ", ".join(found[0][k] for k in common) if common
        else " as specified, on the full data set")]
    varying = sorted((k for k in keys if k not in common),
                     key=lambda k: keys.index(k) if k not in PROTOCOL_KEYS
                     else PROTOCOL_KEYS.index(k))
    if varying:
        lines.append("by group: " + "; ".join(setting_text(k, runs)
                                               for k in varying))
    devices = sorted({f"{r.value('device')} ({r.value('backend')})"
                      for r in runs})
    lines.append("on " + devices[0] if len(devices) == 1
                 else f"on {len(devices)} devices/backends, by group")
    return [textwrap.fill(line, TITLE_WIDTH, break_on_hyphens=False)
            for line in lines]


def figure_title(text, groups, runs):
    """`text`, what the bands are, then `describe_runs`' lines."""
    several = any(len(g.runs) > 1 for g in groups)
    band = "; lines: mean over runs, bands: min–max" if several else ""
    return "\n".join([f"{text}{band}", *describe_runs(runs)])


