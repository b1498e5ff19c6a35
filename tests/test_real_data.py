"""A short run of batchnorm and renorm on the real CIFAR-10, then plot.py.

Runs only where the data is (CIFAR10_DIR, or ../shared/data beside the
checkout, as in CI) and only on the TensorFlow backend, so that the suite,
which runs once per backend, trains on the real data once: WRN-10-1 on a
stratified 2000-image subset for 2 epochs of batch 50, validated on 1000 test
images. The moving statistics use
momentum 0.9 so that they catch up within the 80 steps of such a short run.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parent.parent
# The two the experiment compares (keras-renorm trains in test_train's tiny
# runs, on every backend).
NORMS = ("batchnorm", "renorm")
COLUMNS = ["epoch", "seconds", "eval_seconds", "loss", "accuracy", "val_loss",
           "val_accuracy", "val_loss_train_mode", "val_accuracy_train_mode",
           "lr"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def find_data():
    candidates = [os.environ.get("CIFAR10_DIR"),
                  ROOT.parent / "shared" / "data" / "cifar-10-batches-py"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "data_batch_1").is_file():
            return Path(candidate)
    return None


DATA = find_data()
pytestmark = [
    pytest.mark.skipif(DATA is None, reason="no CIFAR-10 (set CIFAR10_DIR)"),
    pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                       reason="trains on the real data on TensorFlow only"),
]


def run(script, *args):
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
        capture_output=True, text=True, timeout=900,
        env=dict(os.environ, KERAS_BACKEND="tensorflow"), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    outputs = {}
    for norm in NORMS:
        outputs[norm] = run(
            "train.py", "--norm", norm, "--data-dir", DATA, "--train-size",
            2000, "--val-size", 1000, "--epochs", 2, "--depth", 10, "--width",
            1, "--batch-size", 50, "--norm-momentum", 0.9, "--name", norm,
            "--history-dir", out / "history", "--weights-dir",
            out / "weights").stdout
    run("plot.py", "--history-dir", out / "history", "--plots-dir",
        out / "plots")
    return out, outputs


def history(out, norm):
    with open(out / "history" / f"{norm}.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.parametrize("norm", NORMS)
def test_history(runs, norm):
    out, outputs = runs
    rows = history(out, norm)
    expected = COLUMNS + (["r_max", "d_max"] if norm == "renorm" else [])
    assert list(rows[0]) == expected
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        values = {k: float(v) for k, v in row.items()}
        assert values["seconds"] > 0 and values["eval_seconds"] > 0
        assert 0 < values["loss"] < 10 and 0 < values["val_loss"] < 10
        assert 0 <= values["accuracy"] <= 1
        assert values["lr"] == 1e-3
        if norm == "renorm":  # still in the warm-up: plain BN
            assert (values["r_max"], values["d_max"]) == (1.0, 0.0)
    # Learns: clearly better than chance (0.1) on held-out images.
    assert max(float(r["val_accuracy"]) for r in rows) > 0.2
    assert float(rows[-1]["accuracy"]) > 0.2
    record = json.loads((out / "history" / f"{norm}.json").read_text())
    assert record["norm"] == norm and record["train_size"] == 2000
    assert record["val_size"] == 1000 and record["backend"] == "tensorflow"
    assert record["result"]["test_images"] == 10000
    assert "test accuracy" in outputs[norm]
    for suffix in (".weights.h5", ".best.weights.h5", ".state.npz"):
        assert (out / "weights" / f"{norm}{suffix}").stat().st_size > 0


def test_plots(runs):
    out, _ = runs
    for name in ("curves.png", "seconds_per_epoch.png"):
        content = (out / "plots" / name).read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 10_000
    timing = (out / "plots" / "timing.md").read_text()
    for norm in NORMS:
        assert norm in timing
