"""What makes a run's results trustworthy: a held-out validation split,
test accuracy of the last and the best-validation weights, schedule
warnings, the precision policies, provenance (tiny fake CIFAR-10, WRN-10-1,
on this backend)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

import train
from experiment import network
from experiment import preprocessing
from experiment import protocols
from experiment import runtime
from experiment.cli import UsageError
from train_runs import read_history
from train_runs import run_main
from train_runs import tiny_args

ROOT = Path(__file__).resolve().parent.parent


def prepared(data_dir, *flags):
    config, _options, _ = train.parse_args(["--norm", "renorm", *flags])
    return config, preprocessing.prepare(config, data_dir)


def image_keys(images):
    """One hashable key per image (the fake images are noise: unique)."""
    return {np.round(image, 3).tobytes() for image in images}


# ------------------------------------------------------------- validation
@pytest.mark.backend_independent
def test_validation_is_held_out_of_the_training_set(data_dir):
    config, arrays = prepared(data_dir, "--train-size", "200")
    assert config["val_from"] == "train"
    assert config["val_size"] == 50  # a tenth of the 500 training images
    assert len(arrays.x_val) == 50 and len(arrays.x_train) == 200
    trained = preprocessing.normalize(arrays.x_train, arrays.mean, arrays.std)
    assert not image_keys(trained) & image_keys(arrays.x_val)
    assert np.bincount(arrays.y_val).tolist() == [5] * 10  # stratified
    # The same split for every run of a seed (another norm, another size).
    _, again = prepared(data_dir, "--train-size", "300", "--norm",
                        "batchnorm")
    assert image_keys(again.x_val) == image_keys(arrays.x_val)
    _, other_seed = prepared(data_dir, "--train-size", "200", "--seed", "1")
    assert image_keys(other_seed.x_val) != image_keys(arrays.x_val)


@pytest.mark.backend_independent
def test_all_the_images_left_are_trained_on_by_default(data_dir):
    config, arrays = prepared(data_dir, "--val-size", "100")
    assert config["train_size"] == 400 and len(arrays.x_train) == 400
    trained = preprocessing.normalize(arrays.x_train, arrays.mean, arrays.std)
    assert len(image_keys(trained) | image_keys(arrays.x_val)) == 500


@pytest.mark.backend_independent
def test_validation_from_the_test_set_as_in_2017(data_dir):
    config, arrays = prepared(data_dir, "--val-from", "test", "--val-size",
                              "20")
    assert config["train_size"] == 500
    tested = preprocessing.normalize(arrays.x_test, arrays.mean, arrays.std)
    assert image_keys(arrays.x_val) <= image_keys(tested)
    config, arrays = prepared(data_dir, "--val-from", "test")
    assert config["val_size"] == 40 == len(arrays.x_val)


@pytest.mark.backend_independent
@pytest.mark.parametrize("flags, words", [
    (["--val-size", "500"], "--val-size 500 is more than the 499 training"),
    (["--val-size", "41", "--val-from", "test"],
     "--val-size 41 is more than the 40 test images"),
    (["--val-size", "100", "--train-size", "401"],
     "--train-size 401 is more than the 400 training images"),
])
def test_sizes_the_data_cannot_give(data_dir, flags, words):
    with pytest.raises(UsageError, match=re.escape(words)):
        prepared(data_dir, *flags)


def test_the_result_tests_the_last_and_the_best_weights(data_dir, tmp_path,
                                                       capsys):
    args = tiny_args(data_dir, tmp_path, "--epochs", "3", "--name", "run",
                     "--val-size", "50")
    assert run_main(args) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "history" / "run.json").read_text())
    result = record["result"]
    assert record["val_from"] == "train" and record["val_size"] == 50
    assert result["test_images"] == 40
    rows = read_history(tmp_path, "run")
    best = max(rows, key=lambda r: float(r["val_accuracy"]))
    assert result["best_epoch"] == int(best["epoch"])
    assert result["best_val_accuracy"] == pytest.approx(
        float(best["val_accuracy"]), abs=1e-6)
    # Each is an accuracy on the 40 test images.
    for key in ("test_accuracy", "best_test_accuracy"):
        assert result[key] * 40 == pytest.approx(round(result[key] * 40))
    assert f"{result['best_test_accuracy']:.4f} (weights of epoch" in out
    # The best weights, tested again, give the recorded figure.

    config = {**record, "seed": 0}
    with runtime.keras_settings(config):
        model = network.build_model(config)
        model.compile(loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        model.load_weights(tmp_path / "weights" / "run.best.weights.h5")
        arrays = preprocessing.prepare(dict(config), data_dir)
        x_test = preprocessing.normalize(arrays.x_test, arrays.mean,
                                         arrays.std)
        again = model.evaluate(x_test, arrays.y_test, verbose=0,
                               return_dict=True)["accuracy"]
    assert again == pytest.approx(result["best_test_accuracy"])


# --------------------------------------------------------------- schedule
def schedule(epochs, steps, **overrides):
    config, _, _ = train.parse_args(["--norm", "renorm", "--epochs",
                                     str(epochs)])
    config.update(overrides)
    return protocols.schedule_warnings(config, steps)


@pytest.mark.backend_independent
def test_schedule_warnings():
    # The seed protocol's full run: 39,100 steps, no warning.
    assert schedule(100, 391) == []
    # train.py's quick look: 80 steps against a 5000-step warm-up.
    [warning] = schedule(2, 40)
    assert "80 steps end before the renorm warm-up (5000 steps)" in warning
    assert "plain batch normalization" in warning
    assert "--renorm-schedule 0.04,0.19,0.31" in warning
    [warning] = schedule(20, 391)  # 7820 steps
    assert ("by its end r_max reaches only 1.16 of 3 and d_max 0.70 of 5"
            in warning)
    # The 2017 run itself ends with r_max 2.95 (its steps stop short of
    # 40,000): no warning for that.
    assert schedule(100, 391) == []
    # A warm-up shorter than 3 time constants of the moving averages.
    [warning] = schedule(10, 25, warmup_steps=32, d_max_steps=160,
                         r_max_steps=256, norm_momentum=0.99)
    assert "warm-up (32 steps) is shorter than 3 time constants" in warning
    assert "(300 steps at --norm-momentum 0.99)" in warning
    assert schedule(10, 25, warmup_steps=32, d_max_steps=160,
                    r_max_steps=250, norm_momentum=0.9) == []
    assert schedule(2, 40, norm="batchnorm") == []


@pytest.mark.backend_independent
def test_a_short_run_says_it_trains_plain_bn(data_dir, tmp_path, capsys):
    assert run_main(tiny_args(data_dir, tmp_path)) == 0
    err = capsys.readouterr().err
    assert ("train.py: warning: the run's 2 steps end before the renorm "
            "warm-up (5000 steps)") in err


# -------------------------------------------------------------- precision
@pytest.mark.backend_independent
def test_precision_flags():
    config, _, _ = train.parse_args(["--norm", "renorm"])
    assert config["precision"] == "float32"
    for flags, expected in [(["--precision", "mixed_bfloat16"],
                             "mixed_bfloat16"),
                            (["--precision", "mixed_float16"],
                             "mixed_float16")]:
        config, _, _ = train.parse_args(["--norm", "renorm", *flags])
        assert config["precision"] == expected, flags
    with pytest.raises(UsageError, match="invalid choice"):
        train.parse_args(["--norm", "renorm", "--precision", "float16"])


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_runs(data_dir, tmp_path, precision):
    args = tiny_args(data_dir, tmp_path, "--epochs", "2", "--name", "run",
                     "--val-size", "50", "--precision", precision)
    assert run_main(args) == 0
    record = json.loads((tmp_path / "history" / "run.json").read_text())
    assert record["precision"] == precision
    for row in read_history(tmp_path, "run"):
        assert np.isfinite(float(row["loss"]))
        assert np.isfinite(float(row["val_loss"]))


def test_float16_trains_with_a_loss_scale():
    import keras

    config, _, _ = train.parse_args(["--norm", "renorm", "--depth", "10",
                                     "--width", "1", "--precision",
                                     "mixed_float16"])
    with runtime.keras_settings(config):
        model = network.build_model(config)
        model.compile(optimizer=network.make_optimizer(config),
                      loss="sparse_categorical_crossentropy")
        assert isinstance(model.optimizer,
                          keras.optimizers.LossScaleOptimizer)
        assert model.layers[1].compute_dtype == "float16"
    config["precision"] = "mixed_bfloat16"
    with runtime.keras_settings(config):
        model = network.build_model(config)
        model.compile(optimizer=network.make_optimizer(config),
                      loss="sparse_categorical_crossentropy")
        assert not isinstance(model.optimizer,
                              keras.optimizers.LossScaleOptimizer)


# ------------------------------------------------------------- provenance
@pytest.mark.backend_independent
def test_provenance_is_recorded(data_dir, tmp_path):
    assert run_main(tiny_args(data_dir, tmp_path, "--name", "run")) == 0
    record = json.loads((tmp_path / "history" / "run.json").read_text())
    provenance = record["provenance"]
    assert set(provenance) == {"commit", "dirty", "version"}
    assert provenance == record["sessions"][0]["provenance"]
    import batch_renorm

    assert provenance["version"] == batch_renorm.__version__
    if (ROOT / ".git").exists():
        assert re.fullmatch("[0-9a-f]{40}", provenance["commit"])
        assert isinstance(provenance["dirty"], bool)


@pytest.mark.backend_independent
def test_provenance_outside_git(monkeypatch):
    monkeypatch.setattr(runtime, "git", lambda *args: None)
    assert runtime.provenance({"versions": {"batch_renorm": "9"}}) == {
        "commit": None, "dirty": None, "version": "9"}
