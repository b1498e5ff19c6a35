"""train.py: flags, protocols, files, bad input, resume and repeatability,
on tiny fake CIFAR-10 files and a tiny network (WRN-10-1)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiment import cli
from experiment import hosts
from experiment import network
from experiment import preprocessing
from experiment import protocols
from experiment import runfiles
from experiment import runtime
from experiment import sampling

import train
from train_runs import ROOT
from train_runs import one_error_line
from train_runs import read_history
from train_runs import run_main
from train_runs import run_script
from train_runs import tiny_args
from train_runs import without_timings

COLUMNS = ["epoch", "seconds", "eval_seconds", "loss", "accuracy", "val_loss",
           "val_accuracy", "val_loss_train_mode", "val_accuracy_train_mode",
           "lr"]


# ------------------------------------------------------------ flags, protocols
@pytest.mark.backend_independent
def test_protocols():
    config, _, _ = train.parse_args(["--norm", "renorm"])
    assert config["protocol"] == "seed"
    assert (config["optimizer"], config["lr"], config["batch_size"],
            config["epochs"], config["augment"]) == ("adam", 1e-3, 128, 100,
                                                     False)
    assert (config["depth"], config["width"]) == (16, 4)
    assert config["name"] == "renorm-seed-b128-s0"

    config, _, _ = train.parse_args(["--norm", "batchnorm", "--protocol", "wrn"])
    assert (config["optimizer"], config["lr"], config["sgd_momentum"],
            config["nesterov"], config["weight_decay"], config["batch_size"],
            config["epochs"], config["augment"]) == (
        "sgd", 0.1, 0.9, True, 5e-4, 128, 200, True)
    assert config["lr_milestones"] == [60, 120, 160]
    lrs = [protocols.lr_at(config, e) for e in (0, 59, 60, 119, 120, 160, 199)]
    np.testing.assert_allclose(lrs, [0.1, 0.1, 0.02, 0.02, 0.004, 0.0008,
                                     0.0008])


@pytest.mark.backend_independent
def test_overrides():
    config, options, explicit = train.parse_args([
        "--norm", "keras-renorm", "--protocol", "wrn", "--epochs", "3",
        "--batch-size", "32", "--lr", "0.05", "--no-augment", "--depth", "10",
        "--width", "2", "--seed", "7", "--precision", "mixed_float16",
        "--r-max", "2",
        "--d-max", "1", "--warmup-steps", "10", "--r-max-steps", "20",
        "--d-max-steps", "30", "--lr-milestones", "1,2", "--dropout", "0.3",
        "--weight-decay", "0", "--val-size", "1000", "--train-size", "5000",
        "--jit-compile", "off", "--no-nesterov", "--history-dir", "h"])
    assert config["name"] == "keras-renorm-wrn-b32-s7"
    expected = dict(epochs=3, batch_size=32, lr=0.05, augment=False, depth=10,
                    width=2, seed=7, precision="mixed_float16", r_max=2.0,
                    d_max=1.0, warmup_steps=10, r_max_steps=20,
                    d_max_steps=30, lr_milestones=[1, 2], dropout=0.3,
                    weight_decay=0.0, val_size=1000, train_size=5000,
                    jit_compile="off", nesterov=False, optimizer="sgd")
    assert {k: config[k] for k in expected} == expected
    assert options.history_dir == Path("h")
    assert options.weights_dir == Path("weights")
    assert "lr" in explicit and "momentum" not in explicit
    assert set(config) == set(protocols.CONFIG_KEYS)


@pytest.mark.backend_independent
def test_help():
    result = run_script("--help")
    assert result.returncode == 0
    for text in ("--norm", "--protocol", "--resume", "--train-size",
                 "--val-size", "--r-max-steps", "--jit-compile",
                 "keras-renorm", "seed", "wrn", "60,120,160", "NAME.csv"):
        assert text in result.stdout


# ------------------------------------------------------------------ bad input
@pytest.mark.backend_independent
def test_unknown_norm():
    result = run_script("--norm", "groupnorm")
    assert result.returncode == 2
    assert "groupnorm" in one_error_line(result)


@pytest.mark.backend_independent
def test_missing_norm():
    result = run_script("--epochs", "3")
    assert result.returncode == 2
    assert "--norm" in one_error_line(result)


@pytest.mark.backend_independent
def test_negative_epochs():
    result = run_script("--norm", "renorm", "--epochs", "-3")
    assert result.returncode == 2
    line = one_error_line(result)
    assert "--epochs" in line and "-3" in line


@pytest.mark.backend_independent
@pytest.mark.parametrize("flags, words", [
    (["--depth", "12"], ["--depth", "6N + 4"]),
    (["--lr", "0"], ["--lr"]),
    (["--dropout", "1"], ["--dropout"]),
    (["--lr-milestones", "60,30"], ["--lr-milestones"]),
    (["--warmup-steps", "100", "--r-max-steps", "50"], ["--r-max-steps"]),
    (["--name", "../x"], ["--name"]),
    (["--resume", "--overwrite"], ["--resume"]),
])
def test_bad_flags(flags, words):
    with pytest.raises(cli.UsageError) as error:
        train.parse_args(["--norm", "renorm", *flags])
    for word in words:
        assert word in str(error.value)


@pytest.mark.backend_independent
def test_missing_data_folder(tmp_path):
    result = run_script(*tiny_args(tmp_path / "nowhere", tmp_path))
    assert result.returncode == 1
    line = one_error_line(result)
    assert "nowhere" in line and "--data-dir" in line


@pytest.mark.backend_independent
def test_corrupt_batch_file(data_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in data_dir.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    content = (broken / "data_batch_4").read_bytes()
    (broken / "data_batch_4").write_bytes(content[:1000])
    result = run_script(*tiny_args(broken, tmp_path))
    assert result.returncode == 1
    assert "data_batch_4" in one_error_line(result)


@pytest.mark.backend_independent
def test_unwritable_output_folder(data_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_script(*tiny_args(data_dir, tmp_path),
                        "--weights-dir", str(blocker / "weights"))
    assert result.returncode == 2
    line = one_error_line(result)
    assert "weights folder" in line and "a-file" in line


@pytest.mark.backend_independent
def test_train_size_too_large(data_dir, tmp_path, capsys):
    assert run_main(tiny_args(data_dir, tmp_path, "--train-size", "100000")) == 2
    assert "--train-size 100000" in capsys.readouterr().err


# --------------------------------------------------------------- a tiny run
def test_run_writes_history_and_weights(data_dir, tmp_path, capsys):
    import keras

    args = tiny_args(data_dir, tmp_path, "--epochs", "2", "--val-size", "20",
                     "--lr-milestones", "1", "--lr-gamma", "0.5",
                     "--warmup-steps", "1", "--r-max-steps", "3",
                     "--d-max-steps", "3")
    assert run_main(args) == 0
    out = capsys.readouterr().out
    name = "renorm-seed-b50-s0"
    assert "test accuracy" in out and "all 40 test images" in out
    assert str(tmp_path / "history" / f"{name}.csv") in out

    rows = read_history(tmp_path, name)
    assert list(rows[0]) == COLUMNS + ["r_max", "d_max"]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        assert float(row["seconds"]) > 0 and float(row["eval_seconds"]) > 0
        assert np.isfinite(float(row["loss"]))
        assert 0 <= float(row["accuracy"]) <= 1
        assert 0 <= float(row["val_accuracy"]) <= 1
    assert [float(r["lr"]) for r in rows] == [1e-3, 5e-4]
    # 2 steps per epoch; the bounds grow from step 1 to step 3.
    assert [float(r["r_max"]) for r in rows] == pytest.approx([2.0, 3.0])
    assert [float(r["d_max"]) for r in rows] == pytest.approx([2.5, 5.0])

    record = json.loads((tmp_path / "history" / f"{name}.json").read_text())
    for key in protocols.CONFIG_KEYS:
        assert key in record
    assert record["norm"] == "renorm" and record["batch_size"] == 50
    assert record["epochs"] == 2 and record["train_size"] == 100
    assert record["val_size"] == 20
    assert record["backend"] == keras.backend.backend()
    assert record["device"] and record["versions"]["keras"] == keras.__version__
    assert record["result"]["test_images"] == 40

    weights = tmp_path / "weights"
    assert sorted(p.name for p in weights.iterdir()) == sorted([
        f"{name}.weights.h5", f"{name}.best.weights.h5", f"{name}.state.npz"])
    config, _, _ = train.parse_args(args)
    model = network.build_model(config)
    step = next(layer for layer in model.layers
                if hasattr(layer, "current_r_max")).step
    model.load_weights(weights / f"{name}.weights.h5")
    assert int(keras.ops.convert_to_numpy(step)) == 4  # 2 epochs of 2 steps
    best_epoch = max(rows, key=lambda r: float(r["val_accuracy"]))["epoch"]
    model.load_weights(weights / f"{name}.best.weights.h5")
    assert int(keras.ops.convert_to_numpy(step)) == 2 * int(best_epoch)
    # The state restores the optimizer too, with the scheduled lr.
    model.compile(optimizer=network.make_optimizer(config),
                  loss="sparse_categorical_crossentropy")
    meta = runfiles.load_state(model, weights / f"{name}.state.npz")
    # ... and holds every finished epoch's row, as the CSV has it.
    assert meta["epoch"] == 2
    assert [{k: str(v) for k, v in row.items()} for row in meta["rows"]] == (
        rows)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 4
    lr = keras.ops.convert_to_numpy(model.optimizer.learning_rate)
    assert float(lr) == pytest.approx(5e-4)
    assert int(keras.ops.convert_to_numpy(step)) == 4

    # The run exists: starting it again needs --resume or --overwrite.
    assert run_main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert run_main(args + ["--overwrite", "--epochs", "1"]) == 0
    assert len(read_history(tmp_path, name)) == 1


@pytest.mark.parametrize("norm", ["batchnorm", "keras-renorm"])
def test_other_norms_and_wrn_protocol(data_dir, tmp_path, norm):
    args = tiny_args(data_dir, tmp_path, "--protocol", "wrn", "--dropout",
                     "0.2", norm=norm)
    assert run_main(args) == 0
    rows = read_history(tmp_path, f"{norm}-wrn-b50-s0")
    assert list(rows[0]) == COLUMNS
    assert len(rows) == 1 and float(rows[0]["lr"]) == 0.1


def test_same_seed_same_history(data_dir, tmp_path):
    histories = []
    for run in ("a", "b", "c"):
        seed = "3" if run == "c" else "2"
        args = tiny_args(data_dir, tmp_path, "--name", run, "--seed", seed,
                         "--augment", "--dropout", "0.1", "--epochs", "2",
                         "--val-size", "20")
        assert run_main(args) == 0
        histories.append(without_timings(read_history(tmp_path, run)))
    assert histories[0] == histories[1]
    assert histories[0] != histories[2]


# -------------------------------------------------------------------- resume
def interrupt_in_epoch(monkeypatch, epoch):
    """Sends this process a SIGINT once training epoch `epoch` (1-based) has
    taken its first batch."""
    calls = []
    original = sampling.train_batches

    def batches(*args, **kwargs):
        calls.append(1)
        for index, batch in enumerate(original(*args, **kwargs)):
            yield batch
            if len(calls) == epoch and index == 0:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)

    monkeypatch.setattr(sampling, "train_batches", batches)


def test_interrupt_and_resume(data_dir, tmp_path, monkeypatch, capsys):
    args = tiny_args(data_dir, tmp_path, "--epochs", "3", "--name", "run")
    interrupt_in_epoch(monkeypatch, 2)
    assert run_main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted (SIGINT) in epoch 2 of 3" in err
    assert "epochs 1-1 are saved" in err and "--resume" in err
    assert [r["epoch"] for r in read_history(tmp_path, "run")] == ["1"]
    monkeypatch.undo()

    assert run_main(args + ["--resume"]) == 0
    assert "resuming run run after epoch 1 of 3" in capsys.readouterr().out
    rows = read_history(tmp_path, "run")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    record = json.loads((tmp_path / "history" / "run.json").read_text())
    assert [s["first_epoch"] for s in record["sessions"]] == [1, 2]
    # The XLA setting the run resolved (`--jit-compile auto`) is recorded.
    assert all(isinstance(s["jit_compile"], bool) for s in record["sessions"])

    # An uninterrupted run gives the same history (the shuffling and the
    # augmentation of an epoch depend on the seed and the epoch only).
    assert run_main(tiny_args(data_dir, tmp_path, "--epochs", "3")) == 0
    whole = read_history(tmp_path, "renorm-seed-b50-s0")
    assert without_timings(rows) == without_timings(whole)
    # ... and the same corrections, each epoch's from its own steps.
    history = tmp_path / "history"
    corrections = (history / "run.corrections.csv").read_text()
    assert corrections == (
        history / "renorm-seed-b50-s0.corrections.csv").read_text()
    # A row per epoch and renorm layer (WRN-10-1 has 7).
    assert len(corrections.splitlines()) == 1 + 3 * 7


def test_train_mode_validation_and_corrections(data_dir, tmp_path):
    """Groups of 4 of pairs: batchnorm's training-mode validation differs
    from its inference; renorm's agrees once its bounds are open and do not
    bind, and its corrections CSV says how much r and d corrected."""
    flags = ("--virtual-batch-size", "4", "--sampling", "pairs",
             "--val-size", "40", "--epochs", "3", "--norm-momentum", "0.5")
    assert run_main(tiny_args(data_dir, tmp_path, *flags, "--name", "bn",
                              norm="batchnorm")) == 0
    assert run_main(tiny_args(data_dir, tmp_path, *flags, "--name", "brn",
                              "--warmup-steps", "1", "--r-max-steps", "2",
                              "--d-max-steps", "2", "--r-max", "100",
                              "--d-max", "100")) == 0
    bn, brn = read_history(tmp_path, "bn"), read_history(tmp_path, "brn")
    assert list(bn[0]) == COLUMNS and list(brn[0]) == COLUMNS + [
        "r_max", "d_max"]
    gap = [abs(float(r["val_loss"]) - float(r["val_loss_train_mode"]))
           for r in bn]
    assert min(gap) > 1e-3
    with open(tmp_path / "history" / "brn.corrections.csv",
              newline="") as file:
        corrections = list(csv.DictReader(file))
    assert list(corrections[0]) == list(runfiles.CORRECTION_COLUMNS)
    assert [int(r["epoch"]) for r in corrections] == [1] * 7 + [2] * 7 + [
        3] * 7
    last = [r for r in corrections if r["epoch"] == "3"]
    # Bounds of 100 never bind: r and d turn the training outputs into the
    # inference outputs, up to float rounding.
    assert all(float(r["r_clipped"]) == float(r["d_clipped"]) == 0
               for r in last)
    assert all(float(r["r_dev"]) > 0 and float(r["d_dev"]) > 0 for r in last)
    assert float(brn[-1]["val_loss_train_mode"]) == pytest.approx(
        float(brn[-1]["val_loss"]), rel=1e-4)
    # The first epoch holds the warm-up step (r = 1, d = 0, clipped).
    assert all(float(r["r_clipped"]) > 0 for r in corrections[:7])
    assert not (tmp_path / "history" / "bn.corrections.csv").exists()


@pytest.mark.backend_independent
@pytest.mark.parametrize("flags, words", [
    (["--norm", "batchnorm", "--track-corrections"], "needs --norm renorm"),
    (["--norm", "renorm", "--train-mode-validation", "--devices", "2"],
     "needs one device"),
])
def test_measurement_flags_refused(flags, words, monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    with pytest.raises(cli.UsageError, match=words):
        train.parse_args(flags)


@pytest.mark.backend_independent
def test_resume_repairs_the_history(data_dir, tmp_path, capsys):
    args = tiny_args(data_dir, tmp_path, "--epochs", "2", "--name", "run",
                     "--val-size", "20")
    assert run_main(args) == 0
    path = tmp_path / "history" / "run.csv"
    complete = path.read_text()
    # Killed after the state was saved but before its row: the row comes back.
    path.write_text("".join(complete.splitlines(keepends=True)[:-1]))
    assert run_main(args + ["--resume"]) == 0
    assert path.read_text() == complete
    # A row beyond the saved state (killed before the state): dropped.
    path.write_text(complete + "3,1,1,1,1,1,1,1,1,1\n")
    assert run_main(args + ["--resume", "--epochs", "3"]) == 0
    assert [r["epoch"] for r in read_history(tmp_path, "run")] == ["1", "2", "3"]
    assert path.read_text().startswith(complete)
    capsys.readouterr()
    # The saved configuration holds; only --epochs and speed settings change.
    assert run_main(args + ["--resume", "--lr", "0.5"]) == 2
    assert "--lr 0.5 differs" in capsys.readouterr().err


def test_sigint_in_a_subprocess(data_dir, tmp_path):
    args = tiny_args(data_dir, tmp_path, "--epochs", "1000", "--name", "run",
                     "--val-size", "20")
    history = tmp_path / "history" / "run.csv"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            if history.is_file() and len(history.read_text().splitlines()) > 1:
                break
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert "--resume" in err.strip().splitlines()[-1]
    rows = read_history(tmp_path, "run")
    with np.load(tmp_path / "weights" / "run.state.npz") as state:
        saved = json.loads(str(state["meta"]))["epoch"]
    assert [int(r["epoch"]) for r in rows] == list(range(1, saved + 1))


# ------------------------------------------ non-i.i.d. batches, schedule
@pytest.mark.backend_independent
def test_classes_per_batch_and_renorm_schedule_flags():
    config, _, _ = train.parse_args(["--norm", "renorm"])
    assert config["classes_per_batch"] is None
    assert config["renorm_schedule"] is None
    config, _, _ = train.parse_args([
        "--norm", "renorm", "--batch-size", "32", "--classes-per-batch", "16",
        "--renorm-schedule", "0.04,0.19,0.31"])
    assert config["name"] == "renorm-seed-b32-k16-s0"
    assert config["classes_per_batch"] == 16
    assert config["renorm_schedule"] == [0.04, 0.19, 0.31]
    assert "--classes-per-batch  none" in protocols.protocols_table()
    assert "--renorm-schedule    none" in protocols.protocols_table()
    resolved = dict(config)
    protocols.resolve_schedule(resolved, 391)  # 100 epochs of 391 steps
    assert (resolved["warmup_steps"], resolved["d_max_steps"],
            resolved["r_max_steps"]) == (1564, 7429, 12121)


@pytest.mark.backend_independent
@pytest.mark.parametrize("flags, words", [
    (["--classes-per-batch", "3"], ["--classes-per-batch 3", "divide",
                                    "--batch-size 128"]),
    (["--classes-per-batch", "0"], ["--classes-per-batch"]),
    (["--renorm-schedule", "0.1,0.2"], ["--renorm-schedule", "W,D,R"]),
    (["--renorm-schedule", "0.3,0.2,0.5"], ["--renorm-schedule"]),
    (["--renorm-schedule", "0.1,x,0.5"], ["--renorm-schedule"]),
    (["--renorm-schedule", "0.1,0.2,0.3", "--warmup-steps", "5"],
     ["--renorm-schedule excludes --warmup-steps"]),
    (["--renorm-schedule", "0.1,0.2,0.3", "--d-max-steps", "5",
      "--r-max-steps", "6"],
     ["excludes --d-max-steps, --r-max-steps"]),
])
def test_bad_sampling_and_schedule_flags(flags, words):
    with pytest.raises(cli.UsageError) as error:
        train.parse_args(["--norm", "renorm", *flags])
    for word in words:
        assert word in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.backend_independent
def test_too_many_classes_per_batch_for_the_data(data_dir, tmp_path, capsys):
    args = tiny_args(data_dir, tmp_path, "--classes-per-batch", "25",
                     "--batch-size", "50")
    assert run_main(args) == 2
    err = capsys.readouterr().err
    assert "--classes-per-batch 25 is more than the 10 classes" in err


@pytest.mark.backend_independent
def test_non_iid_run_records_sampling_and_scaled_schedule(
        data_dir, tmp_path, monkeypatch, capsys):
    seen = []
    original = sampling.train_batches

    def spy(*args, **kwargs):
        for x, y in original(*args, **kwargs):
            seen.append(np.asarray(y))
            yield x, y

    monkeypatch.setattr(sampling, "train_batches", spy)
    args = tiny_args(data_dir, tmp_path, "--classes-per-batch", "5",
                     "--renorm-schedule", "0.25,0.5,1", "--epochs", "2",
                     "--val-size", "20")
    assert run_main(args) == 0
    name = "renorm-seed-b50-k5-s0"
    assert f"run {name}" in capsys.readouterr().out
    # 100 images, 10 of each class, in groups of 50 / 5 = 10: 2 batches an
    # epoch, each of 5 classes, each image once per epoch.
    assert len(seen) == 4
    assert all(len(np.unique(y)) == 5 and len(y) == 50 for y in seen)
    for epoch in (seen[:2], seen[2:]):
        assert np.bincount(np.concatenate(epoch)).tolist() == [10] * 10
    record = json.loads((tmp_path / "history" / f"{name}.json").read_text())
    assert record["classes_per_batch"] == 5 and record["batch_size"] == 50
    assert record["renorm_schedule"] == [0.25, 0.5, 1.0]
    assert record["steps_per_epoch"] == 2
    # The fractions of 2 epochs x 2 steps: warm-up 1, d_max at 2, r_max at 4.
    assert (record["warmup_steps"], record["d_max_steps"],
            record["r_max_steps"]) == (1, 2, 4)
    rows = read_history(tmp_path, name)
    assert [float(r["r_max"]) for r in rows] == pytest.approx([5 / 3, 3.0],
                                                              rel=1e-5)
    assert [float(r["d_max"]) for r in rows] == pytest.approx([5.0, 5.0])

    # Resumed with more epochs, the run keeps the steps it started with.
    assert run_main(args + ["--resume", "--epochs", "3"]) == 0
    record = json.loads((tmp_path / "history" / f"{name}.json").read_text())
    assert (record["warmup_steps"], record["d_max_steps"],
            record["r_max_steps"], record["epochs"]) == (1, 2, 4, 3)
    assert len(read_history(tmp_path, name)) == 3
    assert len(seen) == 6
    capsys.readouterr()
    # (A different K is a different run name: a new run.)
    assert run_main(args + ["--resume", "--renorm-schedule", "0,0,0"]) == 2
    assert "--renorm-schedule [0.0, 0.0, 0.0] differs" in (
        capsys.readouterr().err)


@pytest.mark.backend_independent
def test_resume_checks_the_saved_configuration():
    """--resume takes the saved configuration with more --epochs; one that
    lacks a key is refused, naming it; a flag that differs from it too."""
    config, _, explicit = train.parse_args(
        ["--norm", "renorm", "--epochs", "5", "--name", "old"])
    saved = dict(config, epochs=3)
    resumed = protocols.resumed_config(config, saved, explicit)
    assert resumed == dict(config, epochs=5)
    del saved["warmup_steps"], saved["classes_per_batch"]
    with pytest.raises(RuntimeError,
                       match="lacks classes_per_batch, warmup_steps"):
        protocols.resumed_config(config, saved, explicit)
    config, _, explicit = train.parse_args(
        ["--norm", "renorm", "--name", "old", "--batch-size", "8",
         "--classes-per-batch", "2"])
    saved.update(warmup_steps=5000, batch_size=8, classes_per_batch=None)
    with pytest.raises(cli.UsageError,
                       match="--classes-per-batch 2 differs"):
        protocols.resumed_config(config, saved, explicit)


@pytest.mark.backend_independent
def test_jit_compile_resolution(monkeypatch):
    """--jit-compile auto: XLA for TensorFlow on a CPU without AVX-512, not
    with it or where its flags cannot be read (docs/speed.md), Keras's
    choice elsewhere. (batch_renorm.cpu_has_avx512 reads the flags:
    test_batch_renorm.test_formulation_follows_the_device.)"""
    import batch_renorm

    def environment(backend, device_type):
        return {"backend": backend, "device_type": device_type}

    for has_avx512, xla in ((True, False), (False, True), (None, False)):
        monkeypatch.setattr(batch_renorm, "cpu_has_avx512",
                            lambda has_avx512=has_avx512: has_avx512)
        tf_cpu = environment("tensorflow", "cpu")
        assert runtime.jit_compile("auto", tf_cpu) is xla
        assert runtime.jit_compile("on", tf_cpu) is True
        assert runtime.jit_compile("off", tf_cpu) is False
    for backend, device in [("tensorflow", "gpu"), ("jax", "cpu"),
                            ("torch", "cpu")]:
        assert runtime.jit_compile("auto", environment(backend, device)) == (
            "auto")
    assert runtime.jit_compile("off", environment("jax", "cpu")) is False


# ------------------------------------------- virtual batches, pairs sampling
@pytest.mark.backend_independent
def test_virtual_batch_size_and_sampling_flags():
    config, _, _ = train.parse_args(["--norm", "renorm"])
    assert config["virtual_batch_size"] is None
    assert config["sampling"] == "iid"
    config, _, _ = train.parse_args(["--norm", "batchnorm",
                                     "--virtual-batch-size", "4",
                                     "--sampling", "pairs"])
    assert (config["virtual_batch_size"], config["sampling"]) == (4, "pairs")
    assert config["name"] == "batchnorm-seed-b128-pairs-v4-s0"
    assert protocols.pairs_group(config) == 4
    config, _, _ = train.parse_args(["--norm", "renorm", "--sampling",
                                     "pairs"])
    assert config["name"] == "renorm-seed-b128-pairs-s0"
    assert protocols.pairs_group(config) == 128  # the whole batch
    config, _, _ = train.parse_args(["--norm", "renorm", "--batch-size", "8",
                                     "--classes-per-batch", "2",
                                     "--virtual-batch-size", "8"])
    assert config["sampling"] == "k2"
    assert config["name"] == "renorm-seed-b8-k2-v8-s0"
    assert protocols.pairs_group(config) is None


@pytest.mark.backend_independent
def test_help_names_virtual_batches_and_sampling():
    result = run_script("--help")
    text = " ".join(result.stdout.split())
    for words in ("--virtual-batch-size V", "--sampling {iid,pairs}",
                  "groups of V examples: ghost BN", "[-vV]",
                  "the paper's pairs of images of a class"):
        assert words in text, words


@pytest.mark.backend_independent
@pytest.mark.parametrize("flags, words", [
    (["--virtual-batch-size", "0"], ["--virtual-batch-size",
                                     "positive integer"]),
    (["--virtual-batch-size", "x"], ["--virtual-batch-size"]),
    (["--norm", "keras-renorm", "--virtual-batch-size", "4"],
     ["--virtual-batch-size 4 needs --norm batchnorm or renorm",
      "keras-renorm"]),
    (["--virtual-batch-size", "256"], ["--virtual-batch-size 256",
                                       "more than --batch-size 128"]),
    (["--sampling", "stratified"], ["--sampling", "stratified"]),
    (["--sampling", "pairs", "--virtual-batch-size", "5"],
     ["--sampling pairs needs an even --virtual-batch-size, not 5"]),
    (["--sampling", "pairs", "--batch-size", "127"],
     ["--sampling pairs needs an even --batch-size, not 127"]),
    (["--sampling", "pairs", "--batch-size", "8", "--classes-per-batch",
      "2"], ["--classes-per-batch 2 is a sampling of its own",
             "excludes --sampling pairs"]),
    (["--sampling", "iid", "--batch-size", "8", "--classes-per-batch", "2"],
     ["excludes --sampling iid"]),
])
def test_bad_virtual_batch_and_sampling_flags(flags, words):
    argv = (["--norm", "renorm"] if "--norm" not in flags else []) + flags
    with pytest.raises(cli.UsageError) as error:
        train.parse_args(argv)
    for word in words:
        assert word in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.backend_independent
def test_virtual_batch_must_divide_the_per_device_batch(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    config, options, _ = train.parse_args(["--norm", "renorm", "--devices",
                                           "4", "--virtual-batch-size", "8"])
    assert train.parallel_record(config, options.processes) == {
        "processes": 1, "per_process_batch": 128, "per_device_batch": 32,
        "statistics": "per group of 8 consecutive examples (4 groups on "
                      "each of the 4 devices)"}
    with pytest.raises(cli.UsageError) as error:
        train.parse_args(["--norm", "renorm", "--devices", "4",
                          "--virtual-batch-size", "12"])
    assert str(error.value) == (
        "--virtual-batch-size 12 must divide the per-device batch 32 "
        "(--batch-size 128 / --devices 4)")
    # --devices all: checked once the devices are counted.
    config, _, _ = train.parse_args(["--norm", "renorm", "--devices", "all",
                                     "--virtual-batch-size", "12"])
    config["devices"] = 4
    arrays = preprocessing_arrays(train_images=128 * 4)
    with pytest.raises(cli.UsageError, match="must divide the per-device"):
        preprocessing.check_devices(config, arrays)
    config["virtual_batch_size"], config["sampling"] = None, "pairs"
    with pytest.raises(cli.UsageError, match="--sampling pairs with --devices"):
        preprocessing.check_devices(config, arrays)


def preprocessing_arrays(train_images):
    """The sizes check_devices reads, as prepare gives them."""
    import types

    return types.SimpleNamespace(y_train=np.zeros(train_images),
                                 y_val=np.zeros(1000), y_test=np.zeros(10000))


@pytest.mark.backend_independent
@pytest.mark.parametrize("devices, virtual, processes, statistics", [
    (1, None, 1, "of the whole batch"),
    (4, None, 1, "of the whole batch, synchronized across the 4 devices"),
    (1, 4, 1, "per group of 4 consecutive examples"),
    (1, 128, 1, "of the whole batch"),
    (4, 32, 1, "per device (groups of 32 = the per-device batch)"),
    (4, 128, 1, "of the whole batch, synchronized across the 4 devices"),
    (4, None, 2, ("of the whole batch, synchronized across the 4 devices "
                  "of the 2 processes")),
    (4, 32, 2, "per device (groups of 32 = the per-device batch)"),
])
def test_statistics_in_the_record(devices, virtual, processes, statistics):
    config = {"devices": devices, "virtual_batch_size": virtual,
              "batch_size": 128}
    record = train.parallel_record(config, hosts.Processes(processes, 0))
    assert record["statistics"] == statistics
    assert record["per_process_batch"] == 128 // processes


@pytest.mark.backend_independent
def test_resume_keeps_the_virtual_batch_and_sampling():
    config, _, explicit = train.parse_args(
        ["--norm", "renorm", "--name", "run", "--virtual-batch-size", "4"])
    saved = dict(config, virtual_batch_size=None)
    with pytest.raises(cli.UsageError) as error:
        protocols.resumed_config(config, saved, explicit)
    assert str(error.value).startswith(
        "--virtual-batch-size 4 differs from the saved configuration of run "
        "'run' (not set)")
    config, _, explicit = train.parse_args(
        ["--norm", "renorm", "--name", "run", "--sampling", "pairs"])
    with pytest.raises(cli.UsageError, match="--sampling pairs differs"):
        protocols.resumed_config(config, dict(config, sampling="iid"),
                                 explicit)
    # Without the flags, the saved values hold.
    config, _, explicit = train.parse_args(["--norm", "renorm", "--name",
                                            "run"])
    saved = dict(config, virtual_batch_size=8, sampling="pairs")
    resumed = protocols.resumed_config(config, saved, explicit)
    assert (resumed["virtual_batch_size"], resumed["sampling"]) == (8,
                                                                    "pairs")


@pytest.mark.backend_independent
def test_pairs_run_records_its_sampling(data_dir, tmp_path, monkeypatch,
                                        capsys):
    seen = []
    original = sampling.train_batches

    def spy(*args, **kwargs):
        for x, y in original(*args, **kwargs):
            seen.append(np.asarray(y))
            yield x, y

    monkeypatch.setattr(sampling, "train_batches", spy)
    args = tiny_args(data_dir, tmp_path, "--sampling", "pairs",
                     "--val-size", "20", norm="batchnorm")
    assert run_main(args) == 0
    name = "batchnorm-seed-b50-pairs-s0"
    assert "of pairs of a class" in capsys.readouterr().out
    # 100 images, 5 pairs of each class, in batches of 25 pairs: 2 or 3
    # pairs of each class in each.
    assert [len(y) for y in seen] == [50, 50]
    for y in seen:
        assert np.array_equal(y[0::2], y[1::2])
        assert set(np.bincount(y[0::2], minlength=10)) <= {2, 3}
    record = json.loads((tmp_path / "history" / f"{name}.json").read_text())
    assert record["sampling"] == "pairs"
    assert record["virtual_batch_size"] is None
    assert record["classes_per_batch"] is None
    assert record["statistics"] == "of the whole batch"
    assert list(read_history(tmp_path, name)[0]) == COLUMNS


@pytest.mark.backend_independent
@pytest.mark.parametrize("norm", ["batchnorm", "renorm"])
def test_virtual_batch_run_records_it_and_refuses_another_on_resume(
        data_dir, tmp_path, capsys, norm):
    args = tiny_args(data_dir, tmp_path, "--virtual-batch-size", "10",
                     "--sampling", "pairs", "--val-size", "20",
                     "--name", "run", norm=norm)
    assert run_main(args) == 0
    out = capsys.readouterr().out
    assert "normalized in groups of 10 (virtual batches)" in out
    record = json.loads((tmp_path / "history" / "run.json").read_text())
    assert record["virtual_batch_size"] == 10
    assert record["sampling"] == "pairs"
    assert record["statistics"] == "per group of 10 consecutive examples"
    assert record["result"]["test_images"] == 40
    # batchnorm's exact BN mode has no bounds to record.
    assert list(read_history(tmp_path, "run")[0]) == COLUMNS + (
        ["r_max", "d_max"] if norm == "renorm" else [])

    config, _, _ = train.parse_args(args)
    layers = [layer for layer in network.build_model(config).layers
              if type(layer).__name__ == "BatchRenormalization"]
    assert layers and all(layer.virtual_batch_size == 10 for layer in layers)
    # --resume keeps it: another V (or none) is refused in one line.
    assert run_main(args + ["--resume", "--epochs", "2",
                            "--virtual-batch-size", "20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("train.py: error: --virtual-batch-size 20 differs from "
                    "the saved configuration of run 'run' (10); leave it out "
                    "to resume, or start a new run with another --name")]
    at = args.index("--virtual-batch-size")
    resumed = args[:at] + args[at + 2:]
    assert run_main(resumed + ["--resume", "--epochs", "2"]) == 0
    record = json.loads((tmp_path / "history" / "run.json").read_text())
    assert (record["virtual_batch_size"], record["epochs"]) == (10, 2)
