"""plot.py on histories with train.py's newer files (no Keras involved):
NAME.corrections.csv (renorm's r and d by layer and epoch) drawn as
heatmaps and never taken for a history; the val_*_train_mode columns drawn
as the train/inference gap beside the curves; older histories without
either, and damaged files, as before."""

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from test_plot import assert_png
from test_plot import full_config
from test_plot import overlaps
from test_plot import PROVENANCE
from test_plot import run_main
from test_plot import table

from experiment import curves_study
from experiment import gap_study
from experiment import histories
from experiment import runfiles
from experiment.report import TITLE_WIDTH
from experiment.report import norm_colors

pytestmark = pytest.mark.backend_independent

# Layers in a model's order (not alphabetical, nor sorted by number).
LAYERS = ("stem_norm", "block1_norm", "block2_norm", "block10_norm",
          "head_norm")
STATISTICS = ("r_dev", "d_dev", "r_clipped", "d_clipped")


def write_history(history, name, norm, val_accuracy, train_mode=None,
                  seed=0, **config):
    """NAME.csv and NAME.json as train.py writes them (its columns, from
    runfiles): with `train_mode`, the training-mode validation accuracies
    (train_mode_validation on), else an older history without them."""
    history.mkdir(exist_ok=True)
    config = full_config(**{
        "norm": norm, "batch_size": 128, "epochs": len(val_accuracy),
        "seed": seed, "name": name, "backend": "jax", "device": "cpu",
        "provenance": PROVENANCE,
        "train_mode_validation": train_mode is not None,
        "track_corrections": norm == "renorm", **config})
    (history / f"{name}.json").write_text(json.dumps(config))
    rows = []
    for epoch, accuracy in enumerate(val_accuracy, start=1):
        row = {"epoch": epoch, "seconds": 2.0, "eval_seconds": 0.5,
               "loss": 2.0 / epoch, "accuracy": accuracy + 0.05,
               "val_loss": 2.1 / epoch, "val_accuracy": accuracy, "lr": 0.1,
               "r_max": 1.0, "d_max": 0.0}
        if train_mode is not None:
            row.update(val_loss_train_mode=2.3 / epoch,
                       val_accuracy_train_mode=train_mode[epoch - 1])
        rows.append(row)
    runfiles.write_rows(history / f"{name}.csv", runfiles.columns(config),
                        rows)
    return config


def corrections_rows(epochs, layers=LAYERS, seed=0):
    """Random statistics, a row per epoch and layer, in the model's order;
    the bounds grow after a warm-up of one epoch."""
    rng = np.random.default_rng(seed)
    rows = []
    for epoch in range(1, epochs + 1):
        for layer in layers:
            rows.append({"epoch": epoch, "layer": layer,
                         "r_dev": rng.uniform(0, 0.3),
                         "d_dev": rng.uniform(0, 0.5),
                         "r_clipped": rng.uniform(0, 1),
                         "d_clipped": rng.uniform(0, 1),
                         "r_max": 1.0 + min(2.0, 0.1 * (epoch - 1)),
                         "d_max": min(5.0, 0.2 * (epoch - 1))})
    return rows


def write_corrections(history, name, rows,
                      header=runfiles.CORRECTION_COLUMNS):
    runfiles.write_rows(history / f"{name}.corrections.csv", header, rows)


@pytest.fixture
def study(tmp_path):
    """An older batchnorm history (no training-mode columns, no
    corrections), a newer batchnorm run and a renorm run with both."""
    history = tmp_path / "history"
    write_history(history, "bn-old", "batchnorm", [0.3, 0.4, 0.5])
    write_history(history, "bn-new", "batchnorm", [0.3, 0.45, 0.5],
                  train_mode=[0.2, 0.3, 0.35], seed=1)
    write_history(history, "brn", "renorm", [0.32, 0.46, 0.52],
                  train_mode=[0.3, 0.46, 0.52], warmup_steps=15,
                  steps_per_epoch=10)
    rows = corrections_rows(3)
    write_corrections(history, "brn", rows)
    return history, rows


def test_a_corrections_file_is_not_a_history(study, tmp_path):
    history, _ = study
    paths = histories.history_paths([], history)
    assert sorted(p.name for p in paths) == ["bn-new.csv", "bn-old.csv",
                                             "brn.csv"]
    # Named on the command line, it stands for its run.
    assert histories.history_paths([str(history / "brn.corrections.csv")],
                                   history) == [history / "brn.csv"]
    # A run whose own name ends in .corrections is still a run.
    write_history(history, "odd.corrections", "batchnorm", [0.5])
    assert history / "odd.corrections.csv" in histories.history_paths(
        [], history)


def test_figures_for_runs_with_the_new_files(study, tmp_path, capsys):
    history, _ = study
    plots = tmp_path / "plots"
    code, out, err = run_main(["--history-dir", history, "--plots-dir",
                               plots], capsys)
    assert code == 0 and err == ""
    assert "3 run(s)" in out
    assert sorted(p.name for p in plots.iterdir()) == [
        "brn.corrections.png", "curves.png", "seconds_per_epoch.png",
        "timing.md"]
    assert_png(plots / "brn.corrections.png")
    assert_png(plots / "curves.png")
    # Tracking corrections (renorm's alone) neither splits nor names a
    # group: renorm is compared with the batchnorm of its other settings.
    rows = table(out)
    assert rows["renorm, train_mode_validation=True"][
        "ratio to batchnorm"] == "1.00"
    # The gap's tables (experiment.gap_study) follow in timing.md.
    timing = (plots / "timing.md").read_text()
    assert "### Training and inference outputs" in timing
    runs = histories.load_runs(histories.history_paths([], history))
    assert gap_study.tables(runs, []) in timing


def test_old_histories_only_are_as_before(tmp_path, capsys):
    history = tmp_path / "history"
    write_history(history, "bn", "batchnorm", [0.3, 0.4])
    write_history(history, "brn", "renorm", [0.3, 0.5])
    plots = tmp_path / "plots"
    code, out, err = run_main(["--history-dir", history, "--plots-dir",
                               plots], capsys)
    assert code == 0 and err == ""
    assert sorted(p.name for p in plots.iterdir()) == [
        "curves.png", "seconds_per_epoch.png", "timing.md"]
    assert "Training and inference outputs" not in out
    runs = histories.load_runs(histories.history_paths([], history))
    assert not any(histories.GAP in run.frame for run in runs)
    assert all(run.corrections is None for run in runs)
    fig = curves_study.plot_curves(histories.group_runs(runs), runs)
    assert len(fig.axes) == 4
    plt.close(fig)


# ------------------------------------------------------------- the heatmaps
def heatmaps(fig):
    """{title's statistic: the image's array} of a corrections figure."""
    return {ax.get_title().split(":")[0]: ax.images[0].get_array()
            for ax in fig.axes if ax.images}


def expected(rows, column, epochs, layers=LAYERS):
    values = np.full((len(layers), len(epochs)), np.nan)
    for row in rows:
        values[layers.index(row["layer"]),
               list(epochs).index(row["epoch"])] = row[column]
    return values


def load(history, name):
    (run,) = histories.load_runs([history / f"{name}.csv"])
    return run


def test_heatmaps_hold_the_statistics_by_layer_and_epoch(study):
    history, rows = study
    run = load(history, "brn")
    assert list(run.corrections["layer"].unique()) == list(LAYERS)
    fig = gap_study.plot_corrections(run)
    images = heatmaps(fig)
    assert sorted(images) == sorted(STATISTICS)
    for column in STATISTICS:
        np.testing.assert_allclose(images[column],
                                   expected(rows, column, [1, 2, 3]))
    # A colour bar beside each heatmap; fractions on a fixed 0-1 scale.
    maps = [ax for ax in fig.axes if ax.images]
    assert len(fig.axes) == 4 + 2 + 4  # heatmaps, bounds, colour bars
    assert all(ax.images[0].colorbar is not None for ax in maps)
    clipped = [ax.images[0] for ax in maps if "clipped" in ax.get_title()]
    assert all(image.get_clim() == (0, 1) for image in clipped)
    # Layers in the model's order, top to bottom, on the left.
    left = maps[0]
    assert [t.get_text() for t in left.get_yticklabels()] == list(LAYERS)
    # The bounds after each epoch, at its cells' centres.
    bounds = [ax for ax in fig.axes if ax.get_title().startswith("r_max")]
    (line,) = [line for line in bounds[0].get_lines()
               if len(set(line.get_xdata())) > 1]
    np.testing.assert_allclose(line.get_ydata(), [1.0, 1.1, 1.2])
    np.testing.assert_allclose(line.get_xdata(), [0.5, 1.5, 2.5])
    # The warm-up (15 of 10 steps per epoch) ends at 1.5 epochs.
    assert any(list(line.get_xdata()) == [1.5, 1.5]
               for line in left.get_lines())
    title = fig._suptitle.get_text()
    assert "brn (seed 0)" in title and "3 epochs" in title
    assert max(len(line) for line in title.splitlines()[1:]) <= TITLE_WIDTH
    plt.close(fig)


@pytest.mark.parametrize("epochs, layers", [(3, 13), (100, 13), (100, 30)])
def test_heatmaps_are_legible(tmp_path, epochs, layers):
    history = tmp_path / "history"
    names = tuple(f"group{n // 4 + 1}_block{n % 4 + 1}_norm"
                  for n in range(layers))
    write_history(history, "brn", "renorm", [0.5] * epochs)
    write_corrections(history, "brn", corrections_rows(epochs, names))
    fig = gap_study.plot_corrections(load(history, "brn"))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes[:6]:
        assert not overlaps(ax.get_yticklabels(), renderer)
        assert not overlaps(ax.get_xticklabels(), renderer)
    bottom = fig.axes[4]  # r_max, under the r heatmaps
    ticks = [int(t.get_text()) for t in bottom.get_xticklabels()]
    assert 2 <= len(ticks) <= gap_study.MAX_EPOCH_TICKS + 1
    assert ticks == sorted(ticks) and 1 <= ticks[0] and ticks[-1] <= epochs
    if epochs == 3:
        assert ticks == [1, 2, 3]
    # No figure taller than a page of them.
    assert fig.get_figheight() < 30
    plt.close(fig)


def test_a_missing_epoch_is_a_blank_column(tmp_path):
    history = tmp_path / "history"
    write_history(history, "brn", "renorm", [0.5] * 4)
    rows = [r for r in corrections_rows(4) if r["epoch"] != 3]
    write_corrections(history, "brn", rows)
    fig = gap_study.plot_corrections(load(history, "brn"))
    values = heatmaps(fig)["r_dev"]
    assert values.shape == (len(LAYERS), 4)
    assert values.mask[:, 2].all() and not values.mask[:, [0, 1, 3]].any()
    plt.close(fig)


def test_a_resumed_run_counts_its_latest_rows(tmp_path):
    """Rows of an epoch written twice (a resumed run): the latest count,
    and the layers keep the model's order."""
    history = tmp_path / "history"
    write_history(history, "brn", "renorm", [0.5] * 2)
    first = corrections_rows(2, seed=1)
    again = corrections_rows(2, seed=2)[len(LAYERS):]
    write_corrections(history, "brn", first + again)
    frame = load(history, "brn").corrections
    assert len(frame) == 2 * len(LAYERS)
    assert list(frame["layer"][:len(LAYERS)]) == list(LAYERS)
    last = frame[frame["epoch"] == 2]
    np.testing.assert_allclose(last["r_dev"], [r["r_dev"] for r in again])


BAD_CORRECTIONS = {
    "missing_column": (runfiles.CORRECTION_COLUMNS[:-1], "missing column"),
    "non_numeric": (None, "non-numeric"),
    "no_layer": ("no_layer", "missing"),
    "empty": ("", "empty CSV"),
    "header_only": ((), "no complete epoch"),
}


@pytest.mark.parametrize("damage", BAD_CORRECTIONS)
def test_damaged_corrections_are_skipped_and_named(tmp_path, capsys,
                                                   damage):
    """One warning naming the file; the run kept, without the figure."""
    history = tmp_path / "history"
    write_history(history, "brn", "renorm", [0.5, 0.6],
                  train_mode=[0.5, 0.6])
    rows = corrections_rows(2)
    path = history / "brn.corrections.csv"
    header, why = BAD_CORRECTIONS[damage]
    if damage == "missing_column":
        write_corrections(history, "brn", rows, header)
    elif damage == "non_numeric":
        rows[1]["d_dev"] = "fast"
        write_corrections(history, "brn", rows)
    elif damage == "no_layer":
        rows[2]["layer"] = " "
        write_corrections(history, "brn", rows)
    elif damage == "empty":
        path.write_text("")
    else:
        write_corrections(history, "brn", [])
    plots = tmp_path / "plots"
    code, out, err = run_main(["--history-dir", history, "--plots-dir",
                               plots], capsys)
    assert code == 0 and "Traceback" not in err
    (line,) = err.splitlines()
    assert line.startswith(f"plot.py: warning: skipping the corrections "
                           f"{path}: ")
    assert why in line
    assert "1 run(s)" in out
    assert not (plots / "brn.corrections.png").exists()
    assert_png(plots / "curves.png")


def test_a_corrections_row_being_written_is_dropped(tmp_path, capsys):
    history = tmp_path / "history"
    write_history(history, "brn", "renorm", [0.5, 0.6])
    write_corrections(history, "brn", corrections_rows(2))
    with open(history / "brn.corrections.csv", "a") as file:
        file.write("3,group1_block1_1_norm,0.1")
    plots = tmp_path / "plots"
    code, _out, err = run_main(["--history-dir", history, "--plots-dir",
                               plots], capsys)
    assert code == 0
    (line,) = err.splitlines()
    assert "brn.corrections.csv: dropped incomplete last row" in line
    assert_png(plots / "brn.corrections.png")


# -------------------------------------------------------- the gap's panel
def gap_lines(ax):
    """The curves of a panel (not its zero line or warm-up marks)."""
    return [line for line in ax.get_lines()
            if len(set(line.get_xdata())) > 1
            and set(line.get_ydata()) != {0}]


def test_the_gap_is_a_panel_beside_the_curves(study):
    history, _ = study
    runs = histories.load_runs(histories.history_paths([], history))
    groups = histories.group_runs(runs)
    fig = curves_study.plot_curves(groups, runs)
    assert len(fig.axes) == 5
    gap = fig.axes[-1]
    assert "gap" in gap.get_title()
    # Its own column beside the 2 x 2, as tall as both rows.
    assert gap.get_position().height > 1.5 * fig.axes[0].get_position().height
    # The newer batchnorm run's and the renorm run's, in points; the older
    # batchnorm history has none.
    lines = gap_lines(gap)
    assert len(lines) == 2
    by_color = {line.get_color(): line.get_ydata() for line in lines}
    colors = norm_colors(["batchnorm", "renorm"])
    np.testing.assert_allclose(
        by_color[colors["batchnorm"]],
        100 * (np.array([0.3, 0.45, 0.5]) - [0.2, 0.3, 0.35]))
    np.testing.assert_allclose(
        by_color[colors["renorm"]],
        100 * (np.array([0.32, 0.46, 0.52]) - [0.3, 0.46, 0.52]), atol=1e-9)
    # Its zero drawn; no band: no group has two runs with the gap.
    assert any(set(line.get_ydata()) == {0} for line in gap.get_lines())
    assert not gap.collections
    plt.close(fig)


def test_the_gap_of_seeds_is_their_mean_and_range(tmp_path):
    history = tmp_path / "history"
    accuracy, train_mode = [0.4, 0.5], ([0.3, 0.45], [0.35, 0.3])
    for seed, modes in enumerate(train_mode):
        write_history(history, f"bn{seed}", "batchnorm", accuracy,
                      train_mode=modes, seed=seed)
    runs = histories.load_runs(histories.history_paths([], history))
    groups = histories.group_runs(runs)
    assert len(groups) == 1
    fig = curves_study.plot_curves(groups, runs)
    (line,) = gap_lines(fig.axes[-1])
    gaps = 100 * (np.array(accuracy) - np.array(train_mode))
    np.testing.assert_allclose(line.get_ydata(), gaps.mean(axis=0))
    (band,) = fig.axes[-1].collections
    low, high = gaps.min(axis=0), gaps.max(axis=0)
    vertices = band.get_paths()[0].vertices
    assert np.isclose(vertices[:, 1].min(), low.min())
    assert np.isclose(vertices[:, 1].max(), high.max())
    assert "bands: min–max" in fig._suptitle.get_text()
    plt.close(fig)


def test_runs_without_the_columns_are_left_out_of_their_groups_gap():
    """A group of a run with training-mode validation and one without:
    the gap is the first's; the other curves are both runs'."""
    frame = pd.DataFrame({"epoch": [1.0, 2.0], "seconds": [1.0, 1.0],
                          "loss": [2.0, 1.0], "accuracy": [0.2, 0.3],
                          "val_loss": [2.1, 1.1], "val_accuracy": [0.2, 0.4]})
    with_gap = frame.assign(**{histories.GAP: [0.05, 0.1]})
    runs = [histories.Run(name, Path(f"{name}.csv"),
                          {"norm": "batchnorm", "seed": seed}, data)
            for seed, (name, data) in enumerate([("old", frame),
                                                 ("new", with_gap)])]
    (group,) = histories.group_runs(runs)
    fig, ax = plt.subplots()
    style = ("C0", "-", None, "batchnorm")
    curves_study.plot_group(ax, group, histories.GAP, style, 100)
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_ydata(), [5.0, 10.0])
    assert not ax.collections  # one run: no band
    curves_study.plot_group(ax, group, "val_accuracy", style, 100)
    assert len(ax.collections) == 1  # two runs: their band
    plt.close(fig)


def test_the_gap_in_faceted_curves(tmp_path):
    """Many groups: each row of panels gets the gap's panel."""
    history = tmp_path / "history"
    for norm in ("batchnorm", "renorm", "keras-renorm"):
        for batch_size in (4, 8, 32, 128):
            for classes in (None, 2):
                write_history(history, f"{norm}-{batch_size}-{classes}",
                              norm, [0.2, 0.3], train_mode=[0.1, 0.3],
                              batch_size=batch_size,
                              classes_per_batch=classes)
    runs = histories.load_runs(histories.history_paths([], history))
    groups = histories.group_runs(runs)
    assert len(groups) == 24
    fig = curves_study.plot_curves(groups, runs)
    assert len(fig.axes) == 4 * 5
    for row in range(4):
        assert len(gap_lines(fig.axes[5 * row + 4])) == 6
    plt.close(fig)


def test_empty_training_mode_cells_leave_epochs_out(tmp_path):
    """An epoch validated in inference mode alone (an empty training-mode
    cell) is NaN in the gap, the run kept; a non-number is a bad row."""
    history = tmp_path / "history"
    write_history(history, "bn", "batchnorm", [0.3, 0.4, 0.5],
                  train_mode=[0.1, 0.2, 0.3])
    lines = (history / "bn.csv").read_text().splitlines()
    header = lines[0].split(",")
    for column in histories.TRAIN_MODE_COLUMNS:
        cells = lines[1].split(",")
        cells[header.index(column)] = ""
        lines[1] = ",".join(cells)
    (history / "bn.csv").write_text("\n".join(lines) + "\n")
    run = load(history, "bn")
    gap = run.frame[histories.GAP].to_numpy()
    assert np.isnan(gap[0])
    np.testing.assert_allclose(gap[1:], [0.2, 0.2])
    cells = lines[2].split(",")
    cells[header.index("val_accuracy_train_mode")] = "fast"
    lines[2] = ",".join(cells)
    (history / "bn.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(histories.BadHistory, match="line"):
        histories.read_frame(history / "bn.csv")
