"""experiment/gap_study.py: the corrections study's tables from histories
with training-mode validation and corrections (fake files)."""

import csv
import json

import pytest
from test_plot import full_config

from experiment import gap_study
from experiment import histories
from experiment import report
from experiment import runfiles

pytestmark = pytest.mark.backend_independent


def write_run(folder, name, norm, seed, gaps, test, epochs=2,
              momentum=0.95, corrections=None):
    """A finished run: its JSON, a CSV whose epochs have the given gaps
    (points) and, for renorm, a corrections CSV of two layers."""
    config = full_config(
        norm=norm, name=name, seed=seed, epochs=epochs, batch_size=128,
        virtual_batch_size=4, sampling="pairs", norm_momentum=momentum,
        renorm_schedule=[0.25, 0.5, 0.75], train_mode_validation=True,
        result={"test_accuracy": test})
    (folder / f"{name}.json").write_text(json.dumps(config))
    header = runfiles.columns(config)
    rows = [dict.fromkeys(header, "0.5") | {
        "epoch": str(epoch + 1), "val_accuracy": "0.5",
        "val_accuracy_train_mode": str(0.5 - gap / 100)}
        for epoch, gap in enumerate(gaps)]
    with open(folder / f"{name}.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, header)
        writer.writeheader()
        writer.writerows(rows[:epochs])
    if corrections:
        with open(folder / f"{name}.corrections.csv", "w",
                  newline="") as file:
            writer = csv.DictWriter(file, runfiles.CORRECTION_COLUMNS)
            writer.writeheader()
            for epoch in range(1, len(gaps) + 1):
                for layer, value in zip(("a", "b"), corrections):
                    writer.writerow({
                        "epoch": epoch, "layer": layer, "r_dev": value,
                        "d_dev": 2 * value, "r_clipped": 0, "d_clipped": 1,
                        "r_max": 3, "d_max": 5})


def tables(folder):
    """The study's section of timing.md for the histories in `folder`."""
    runs = histories.load_runs(histories.history_paths([], folder))
    return gap_study.tables(runs, histories.group_runs(runs))


def test_cells_and_paired_differences(tmp_path):
    for seed in range(3):
        write_run(tmp_path, f"bn-s{seed}", "batchnorm", seed,
                  gaps=[4.0, 2.0 + seed], test=0.40 + seed / 100)
        write_run(tmp_path, f"brn-s{seed}", "renorm", seed,
                  gaps=[1.0, 0.0], test=0.45 + seed / 100,
                  corrections=(0.1, 0.3))
    write_run(tmp_path, "unfinished", "renorm", 9, gaps=[5.0], test=0.1,
              epochs=3)  # 1 row of 3 epochs: left out
    text = tables(tmp_path)
    lines = text.splitlines()
    bn = next(line for line in lines if line.startswith("| batchnorm"))
    brn = next(line for line in lines if line.startswith("| renorm"))
    # Batchnorm's last gaps 2, 3, 4: mean 3 with its t-interval.
    assert report.interval_text([2.0, 3.0, 4.0]) in bn
    assert report.interval_text([3.0, 3.5, 4.0]) in bn  # the epochs' means
    assert report.interval_text([0.0, 0.0, 0.0]) in brn
    # The corrections: the last epoch's mean over the two layers.
    cells = [c.strip() for c in brn.strip("|").split("|")]
    assert cells[-4:] == ["0.2", "0.4", "0", "1"]
    assert "(n=3)" in brn and "(n=4)" not in text
    # renorm - batchnorm by seed: 5 points of test accuracy each.
    paired = next(line for line in lines if line.startswith("|  ")
                  and "pairs" in line)
    assert report.interval_text([5.0, 5.0, 5.0]) in paired
    assert report.interval_text([-2.0, -3.0, -4.0]) in paired


def test_a_variant_is_a_cell_of_its_own(tmp_path):
    for seed in range(2):
        write_run(tmp_path, f"bn-s{seed}", "batchnorm", seed, [1.0, 1.0],
                  0.5)
        write_run(tmp_path, f"brn-s{seed}", "renorm", seed, [0.0, 0.0],
                  0.5, corrections=(0.1, 0.1))
        write_run(tmp_path, f"fast-s{seed}", "renorm", seed, [0.0, 0.0],
                  0.52, momentum=0.8, corrections=(0.1, 0.1))
    text = tables(tmp_path)
    assert "norm_momentum 0.8" in text and "norm_momentum 0.95" in text
    paired = [line for line in text.splitlines() if line.startswith("|  ")]
    assert len(paired) == 2
    fast = next(line for line in paired if "0.8" in line)
    assert report.interval_text([2.0, 2.0]) in fast


def test_no_runs(tmp_path):
    assert tables(tmp_path) == ""
    write_run(tmp_path, "old", "batchnorm", 0, [1.0, 1.0], 0.5)
    record = json.loads((tmp_path / "old.json").read_text())
    record["train_mode_validation"] = False  # a history from before
    (tmp_path / "old.json").write_text(json.dumps(record))
    assert tables(tmp_path) == ""
