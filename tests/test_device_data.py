"""experiment/device_data.py and train.py's --input and
--steps-per-execution: the batches made on the device are those made on the
host, and a run trained on them, several steps per execution, is the run
trained on host batches one step at a time (tiny fake CIFAR-10 files and WRN-10-1, on this backend)."""

import json

import keras
import numpy as np
import pytest

from experiment import cli
from experiment import preprocessing
from experiment import network
from experiment import protocols
from experiment import runfiles
from experiment import runtime
from experiment import sampling

from experiment import cifar10
from experiment import device_data
import train
from train_runs import (one_error_line, read_history, run_main, run_script,
                        tiny_args, without_timings)

BACKEND = keras.backend.backend()
# Keras's torch trainer runs one step per call (steps_per_execution 1 only).
STEPS_PER_EXECUTION = 1 if BACKEND == "torch" else 3


# ------------------------------------------------------------------ batches
# Each sampling once, with and without augmentation (independent paths).
@pytest.mark.parametrize("augmented, classes_per_batch, pairs", [
    (True, None, None), (False, 5, None), (True, None, 6)])
def test_device_batches_are_the_host_batches(data_dir, augmented,
                                             classes_per_batch, pairs):
    data = cifar10.load(data_dir)
    images, labels = data.x_train[:230], data.y_train[:230]
    mean, std = preprocessing.channel_stats(data.x_train)
    resident = device_data.DeviceTrainSet(images, labels, mean, std,
                                          augmented=augmented)
    for epoch in (0, 1):
        host = list(sampling.train_batches(
            images, labels, 30, mean, std, sampling.epoch_rng(4, epoch),
            augmented=augmented, classes_per_batch=classes_per_batch,
            pairs=pairs))
        device = list(resident.train_batches(
            30, sampling.epoch_rng(4, epoch),
            classes_per_batch=classes_per_batch, pairs=pairs))
        assert len(device) == len(host) == sampling.steps_per_epoch(
            labels, 30, classes_per_batch, pairs)
        # Batches of every size: the last i.i.d. one (and the last of the
        # pairs) is smaller, class batches made of classes' last groups
        # differ from 30.
        assert len({len(y) for _, y in host}) > 1
        for (x, y), (host_x, host_y) in zip(device, host):
            assert not isinstance(x, np.ndarray)  # a tensor of the backend
            assert keras.backend.standardize_dtype(x.dtype) == "float32"
            assert np.array_equal(keras.ops.convert_to_numpy(y), host_y)
            np.testing.assert_allclose(keras.ops.convert_to_numpy(x), host_x,
                                       rtol=1e-6, atol=1e-6)


def test_augmented_device_batches_are_crops_and_flips():
    """Images whose pixels hold their row, column and index: each device
    crop is the padded image's window at its drawn offsets, mirrored where
    drawn, with zeros from the padding."""
    count = 12
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    images = np.stack([np.stack([rows + 1, cols + 1,
                                 np.full((32, 32), i + 1)], -1)
                       for i in range(count)]).astype(np.uint8)
    labels = np.arange(count, dtype=np.int32) % 10
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32) / 255.0
    resident = device_data.DeviceTrainSet(images, labels, mean, std,
                                          augmented=True)
    rng = sampling.epoch_rng(0, 0)
    order = rng.permutation(count)
    top, left, flip = preprocessing.crop_offsets(count, rng)
    (x, y), = resident.train_batches(count, sampling.epoch_rng(0, 0))
    x = keras.ops.convert_to_numpy(x).astype(int)
    assert np.array_equal(keras.ops.convert_to_numpy(y), labels[order])
    assert 0 < flip.sum() < count and len(set(top)) > 1
    for image, index, row, col, f in zip(x, order, top, left, flip):
        expected_rows = np.arange(32) + row - 4 + 1  # 1-based; <= 0: padding
        expected_cols = np.arange(32) + col - 4 + 1
        if f:
            expected_cols = expected_cols[::-1]
        inside = ((expected_rows[:, None] >= 1) & (expected_rows[:, None] <= 32)
                  & (expected_cols >= 1) & (expected_cols <= 32))
        assert np.array_equal(image[..., 0],
                              np.where(inside, expected_rows[:, None], 0))
        assert np.array_equal(image[..., 1],
                              np.where(inside, expected_cols[None, :], 0))
        assert np.array_equal(image[..., 2], np.where(inside, index + 1, 0))


# ------------------------------------------------------------ train.py flags
@pytest.mark.backend_independent
def test_flags_and_their_resolution():
    config, _, _ = train.parse_args(["--norm", "renorm"])
    assert (config["input"], config["steps_per_execution"]) == ("auto", "auto")
    config, _, _ = train.parse_args(["--norm", "renorm", "--input", "device",
                                     "--steps-per-execution", "8"])
    assert (config["input"], config["steps_per_execution"]) == ("device", 8)

    def environment(backend, device_type):
        return {"backend": backend, "device_type": device_type}

    assert runtime.resolve_input("auto", environment("jax", "cpu")) == "host"
    assert runtime.resolve_input("auto", environment("jax", "gpu")) == "device"
    assert runtime.resolve_input("auto", environment("jax", "tpu")) == "device"
    assert runtime.resolve_input("host", environment("jax", "gpu")) == "host"
    assert runtime.resolve_input("auto", environment("torch", "gpu")) == "device"
    # Keras's TensorFlow trainer copies generator batches through the host.
    assert runtime.resolve_input("auto", environment("tensorflow", "gpu")) == (
        "host")
    resolve = runtime.resolve_steps_per_execution
    assert resolve("auto", environment("jax", "cpu"), 391) == 1
    assert resolve("auto", environment("tensorflow", "gpu"), 391) == 64
    assert resolve("auto", environment("jax", "gpu"), 7) == 7
    # The whole epoch in one compiled program with the data on the device.
    assert resolve("auto", environment("jax", "gpu"), 391, "device") == 391
    assert resolve("auto", environment("jax", "gpu"), 391, "host") == 64
    assert resolve("auto", environment("torch", "gpu"), 391) == 1
    assert resolve(5, environment("jax", "cpu"), 391) == 5
    assert resolve(1, environment("torch", "gpu"), 391) == 1
    with pytest.raises(cli.UsageError, match="--steps-per-execution 3 "
                       "needs tensorflow or jax"):
        resolve(3, environment("torch", "cpu"), 391)


@pytest.mark.backend_independent
@pytest.mark.parametrize("flags, words", [
    (["--steps-per-execution", "0"], ["--steps-per-execution", "0"]),
    (["--steps-per-execution", "many"], ["--steps-per-execution", "many"]),
    (["--input", "gpu"], ["--input", "'gpu'", "host", "device"]),
])
def test_bad_values(flags, words):
    result = run_script("--norm", "renorm", *flags)
    assert result.returncode == 2
    line = one_error_line(result)
    for word in words:
        assert word in line


@pytest.mark.backend_independent
def test_speed_flags_may_change_on_resume():
    """--input and --steps-per-execution do not change the math: --resume
    takes them from its command line; histories from before they existed
    were host runs of one step per execution."""
    config, _, explicit = train.parse_args(
        ["--norm", "renorm", "--name", "old", "--input", "device",
         "--steps-per-execution", "4"])
    saved = dict(config, input="host", steps_per_execution=1)
    resumed = protocols.resumed_config(config, saved, explicit)
    assert (resumed["input"], resumed["steps_per_execution"]) == ("device", 4)


# ---------------------------------------------------------------- tiny runs
def run_args(data_dir, out, name, *extra):
    """WRN-10-1 on 100 images in batches of 20: 5 steps an epoch, not a
    multiple of 3; with augmentation; the renorm bounds grow over steps 2-6,
    so their values show the step count."""
    return tiny_args(data_dir, out, "--name", name, "--batch-size", "20",
                     "--epochs", "2", "--augment", "--val-size", "20",
                     "--warmup-steps", "2", "--r-max-steps", "6",
                     "--d-max-steps", "6", *extra)


def saved_state(out, name):
    with np.load(out / "weights" / f"{name}.state.npz") as state:
        return {key: state[key] for key in state.files if key != "meta"}


def iterations(out, name):
    """The optimizer's step counter and the renorm layers' in the state."""
    config, _, _ = train.parse_args(run_args("data", out, name))
    model = network.build_model(config)
    model.compile(optimizer=network.make_optimizer(config),
                  loss="sparse_categorical_crossentropy")
    runfiles.load_state(model, out / "weights" / f"{name}.state.npz")
    steps = {int(keras.ops.convert_to_numpy(layer.step))
             for layer in model.layers if hasattr(layer, "current_r_max")}
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations)), steps


@pytest.fixture(scope="module")
def host_run(data_dir, tmp_path_factory):
    """The folder of the reference run "host": host batches, 1 step per
    execution."""
    out = tmp_path_factory.mktemp("host-run")
    assert run_main(run_args(data_dir, out, "host", "--input", "host",
                             "--steps-per-execution", "1")) == 0
    return out


def test_device_run_is_the_host_run(data_dir, host_run, tmp_path, capsys):
    n = STEPS_PER_EXECUTION
    assert run_main(run_args(data_dir, tmp_path, "device", "--input", "device",
                             "--steps-per-execution", str(n))) == 0
    assert (f"batches made on the device (--input), {n} training step"
            f"{'s' if n > 1 else ''} per execution") in capsys.readouterr().out

    for out, name, expected in ((host_run, "host", ("host", 1)),
                                (tmp_path, "device", ("device", n))):
        record = json.loads((out / "history" / f"{name}.json").read_text())
        assert (record["input"], record["steps_per_execution"]) == expected
        assert record["steps_per_epoch"] == 5
        # 2 epochs of exactly 5 steps, also when 3 does not divide 5.
        assert iterations(out, name) == (10, {10})

    record = json.loads((tmp_path / "history" / "device.json").read_text())
    compiled = BACKEND == "jax"  # N steps in one program (compiled_epoch)
    assert ("per compiled call" in record["sessions"][0]["training_loop"]) == (
        compiled)
    host = read_history(host_run, "host")
    device = read_history(tmp_path, "device")
    assert list(device[0]) == list(host[0])
    assert [float(r["r_max"]) for r in device] == pytest.approx([2.5, 3.0])
    if compiled:  # the same steps, fused otherwise: float rounding apart
        assert numbers(device) == pytest.approx(numbers(host), rel=1e-3)
    else:
        assert without_timings(device) == without_timings(host)
    host_state = saved_state(host_run, "host")
    device_state = saved_state(tmp_path, "device")
    assert sorted(device_state) == sorted(host_state)
    # Identical on a CPU; compiled, Adam turns a rounding difference in a
    # near-zero gradient into up to a step of lr (1e-3): a few weights move.
    for key, value in host_state.items():
        np.testing.assert_allclose(device_state[key], value,
                                   rtol=1e-3 if compiled else 1e-5,
                                   atol=1e-3 if compiled else 1e-6,
                                   err_msg=key)


def numbers(rows):
    return [float(v) for row in without_timings(rows) for v in row.values()]


def test_resume_may_switch_the_input(data_dir, host_run, tmp_path, capsys):
    """An epoch on the device, then one on the host after --resume: the
    history of two epochs on the host, and the JSON says what was used."""
    n = str(STEPS_PER_EXECUTION)
    assert run_main(run_args(data_dir, tmp_path, "switch", "--epochs", "1",
                             "--input", "device",
                             "--steps-per-execution", n)) == 0
    assert run_main(run_args(data_dir, tmp_path, "switch", "--resume",
                             "--input", "host")) == 0
    assert "resuming run switch after epoch 1 of 2" in capsys.readouterr().out
    switched = read_history(tmp_path, "switch")
    host = read_history(host_run, "host")
    if BACKEND == "jax":  # epoch 1 compiled: float rounding apart
        assert numbers(switched) == pytest.approx(numbers(host), rel=1e-3)
    else:
        assert without_timings(switched) == without_timings(host)
    record = json.loads((tmp_path / "history" / "switch.json").read_text())
    assert (record["input"], record["steps_per_execution"]) == ("host", 1)
    assert [s["first_epoch"] for s in record["sessions"]] == [1, 2]


@pytest.mark.skipif(BACKEND != "torch", reason="Keras's torch trainer only")
def test_torch_runs_one_step_per_execution(data_dir, tmp_path, capsys):
    args = run_args(data_dir, tmp_path, "run", "--steps-per-execution", "3")
    assert run_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--steps-per-execution 3 needs" in err[0]
    assert not (tmp_path / "history" / "run.csv").exists()
