"""Data parallel training (train.py --devices, Keras's DataParallel on JAX)
on 4 virtual CPU devices: the layer's statistics are those of the whole
batch, as on one device; train.py's run on 4 devices is the run on 1; the
sizes that do not split are refused in one line."""

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from train_runs import one_error_line
from train_runs import run_script
from train_runs import tiny_args

ROOT = Path(__file__).resolve().parent.parent
FOUR_DEVICES = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=str(ROOT),
                    XLA_FLAGS="--xla_force_host_platform_device_count=4")
only_on_jax = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="a JAX subprocess with 4 devices; run once, on the jax pass")


LAYER_STEPS = textwrap.dedent("""
    import json, sys
    import numpy as np, keras, jax
    from batch_renorm import BatchRenormalization

    assert len(jax.devices()) == 4, jax.devices()
    rng = np.random.default_rng(0)
    x = rng.normal(2, 3, size=(16, 8, 8, 4)).astype("float32")
    y = rng.normal(size=(16, 8, 8, 4)).astype("float32")

    def steps(distribution):
        keras.distribution.set_distribution(distribution)
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((8, 8, 4)),
            keras.layers.Conv2D(4, 3, padding="same"),
            BatchRenormalization(r_max=1.5, d_max=0.5, warmup_steps=0,
                                 r_max_steps=0, d_max_steps=0,
                                 momentum=0.5)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        for _ in range(3):
            model.train_on_batch(x, y)
        shards = len(model.weights[0].value.sharding.device_set)
        out = model(x, training=True)
        return [np.asarray(v) for v in model.weights], np.asarray(out), shards

    one, out_one, _ = steps(None)
    four, out_four, shards = steps(keras.distribution.DataParallel(
        devices=keras.distribution.list_devices()))
    print(json.dumps({
        "shards": shards,
        "weights": [float(np.max(np.abs(a - b))) for a, b in zip(one, four)],
        "out": float(np.max(np.abs(out_one - out_four))),
        "moved": float(np.max(np.abs(one[-3])))}))
""")


@only_on_jax
def test_the_layer_under_data_parallel_is_the_layer_on_one_device():
    """Three training steps on 4 devices (each a quarter of the batch) give
    the weights, moving statistics and outputs of one device on the whole
    batch: the moments are global (XLA all-reduces them)."""
    result = subprocess.run([sys.executable, "-c", LAYER_STEPS],
                            env=FOUR_DEVICES, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["shards"] == 4  # the variables live on the 4 devices
    assert found["moved"] > 0.1  # the moving mean moved
    assert max(found["weights"]) < 1e-5 and found["out"] < 1e-5, found


PER_DEVICE_STEPS = """
import json
import numpy as np, keras, jax
from batch_renorm import BatchRenormalization
assert len(jax.devices()) == 4
rng = np.random.default_rng(0)
x = rng.normal(2, 3, size=(16, 8, 8, 4)).astype("float32")
x[8:] += 2
y = rng.normal(size=(16, 8, 8, 4)).astype("float32")
CLIP = dict(r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=0, d_max_steps=0, momentum=0.5)

def model_of(size):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 4)), keras.layers.Conv2D(4, 3, padding="same"),
                              BatchRenormalization(virtual_batch_size=size, **CLIP)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model

def steps(distribution, size):
    keras.distribution.set_distribution(distribution)
    model = model_of(size)
    for _ in range(3):
        model.train_on_batch(x, y)
    return [np.asarray(v) for v in model.weights]

def forward_hlo(size):
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices()))
    layer = BatchRenormalization(virtual_batch_size=size, **CLIP)
    layer.build(x.shape)
    sharding = keras.distribution.distribution().get_data_layout(x.shape).backend_layout
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    def outputs(inputs):
        return layer.stateless_call(trainable, non_trainable, inputs, training=True)[0]
    inputs = jax.device_put(x, sharding)
    return jax.jit(outputs).lower(inputs).compile().as_text()

dp = keras.distribution.DataParallel(devices=keras.distribution.list_devices())
one = steps(None, 4); four = steps(dp, 4); whole = steps(None, None)
diff = lambda a, b: max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))
hlo4, hlo_all = forward_hlo(4), forward_hlo(None)
print(json.dumps({"per_device_vs_groups": diff(one, four), "per_device_vs_whole": diff(whole, four),
 "all_reduce_groups": hlo4.count("all-reduce("), "all_reduce_whole": hlo_all.count("all-reduce(")}))
"""


@only_on_jax
def test_per_device_statistics_through_virtual_batches():
    """With virtual_batch_size equal to the per-device batch (16 examples on
    4 devices, groups of 4), three steps under DataParallel are one device's
    steps with groups of 4, i.e. each shard normalized alone (which differs
    from the whole batch's statistics); and the compiled forward pass has no
    all-reduce (each device's moments are its own), where the whole batch's
    statistics take them."""
    result = subprocess.run([sys.executable, "-c", PER_DEVICE_STEPS],
                            env=FOUR_DEVICES, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["per_device_vs_groups"] < 1e-5, found
    assert found["per_device_vs_whole"] > 0.05, found
    assert found["all_reduce_groups"] == 0, found
    assert found["all_reduce_whole"] > 0, found

def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@only_on_jax
def test_a_run_on_four_devices_is_the_run_on_one(data_dir, tmp_path):
    """The same history and test accuracy. At lr 1e-12: Adam turns the last
    bits of the all-reduced gradients (summed in another order than on one
    device) into whole steps of size lr, which at 1e-3 made val_loss differ
    by 1e-4 after two epochs; with no steps, the figures test the data
    split and the synchronized statistics (the gradients: the layer test
    above)."""
    runs = {}
    for devices in ("1", "4"):
        out = tmp_path / devices
        args = tiny_args(data_dir, out, "--epochs", "2", "--batch-size", "20",
                         "--val-size", "20", "--name", "run",
                         "--eval-batch-size", "20", "--devices", devices,
                         "--lr", "1e-12")
        result = subprocess.run([sys.executable, str(ROOT / "train.py"),
                                 *args], cwd=ROOT, env=FOUR_DEVICES,
                                capture_output=True, text=True, timeout=600,
                                check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        record = json.loads((out / "history" / "run.json").read_text())
        runs[devices] = (read_csv(out / "history" / "run.csv"), record)
    (rows_one, one), (rows_four, four) = runs["1"], runs["4"]
    assert (four["devices"], four["per_device_batch"]) == (4, 5)
    assert "synchronized across the 4 devices" in four["statistics"]
    assert four["sessions"][0]["devices"] == 4
    assert one["devices"] == 1 and one["per_device_batch"] == 20
    for a, b in zip(rows_one, rows_four):
        for column in ("loss", "accuracy", "val_loss", "val_accuracy"):
            np.testing.assert_allclose(float(a[column]), float(b[column]),
                                       rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one["result"]["test_accuracy"],
                               four["result"]["test_accuracy"], atol=1e-6)


@only_on_jax
def test_groups_of_the_per_device_batch_are_per_device_statistics(
        data_dir, tmp_path):
    """--virtual-batch-size equal to the per-device batch: each device's
    own statistics, the run of groups of that size on one device."""
    runs = {}
    for devices in ("1", "4"):
        out = tmp_path / devices
        args = tiny_args(data_dir, out, "--batch-size", "20", "--val-size",
                         "20", "--name", "run", "--eval-batch-size", "20",
                         "--devices", devices, "--virtual-batch-size", "5")
        result = subprocess.run([sys.executable, str(ROOT / "train.py"),
                                 *args], cwd=ROOT, env=FOUR_DEVICES,
                                capture_output=True, text=True, timeout=600,
                                check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[devices] = json.loads((out / "history" / "run.json")
                                   .read_text())
    one, four = runs["1"], runs["4"]
    assert one["statistics"] == "per group of 5 consecutive examples"
    assert four["statistics"] == ("per device (groups of 5 = the per-device "
                                  "batch)")
    assert four["virtual_batch_size"] == 5
    np.testing.assert_allclose(one["result"]["test_accuracy"],
                               four["result"]["test_accuracy"], atol=1e-6)


# Sizes that do not split over 4 devices, and the error line of each.
SPLITS = [
    (["--devices", "8"], "--devices 8 is more than the 4 local device(s)"),
    (["--devices", "4", "--batch-size", "50"],
     "--batch-size 50 does not divide by --devices 4"),
    (["--devices", "4", "--batch-size", "20", "--train-size", "90"],
     ("the epoch's last batch (--train-size modulo --batch-size) 10 does "
      "not divide by --devices 4")),
    (["--devices", "4", "--batch-size", "20", "--val-size", "30"],
     "--val-size 30 does not divide by --devices 4"),
    (["--devices", "4", "--batch-size", "20", "--input", "device"],
     "--input device needs one device"),
    (["--devices", "4", "--batch-size", "20", "--classes-per-batch", "2"],
     "--classes-per-batch with --devices 4 is not supported"),
    (["--devices", "two"], "must be a positive integer or all: two"),
    (["--devices", "4", "--batch-size", "20", "--virtual-batch-size", "2"],
     "--virtual-batch-size 2 must divide the per-device batch 5"),
    # --devices all: the same rule once the devices are counted.
    (["--devices", "all", "--batch-size", "20", "--virtual-batch-size",
      "4"], "--virtual-batch-size 4 must divide the per-device batch 5"),
    (["--devices", "4", "--batch-size", "20", "--sampling", "pairs"],
     "--sampling pairs with --devices 4 is not supported"),
]


@only_on_jax
@pytest.mark.parametrize("flags, words", SPLITS)
def test_sizes_that_do_not_split_are_refused(refusals, flags, words):
    code, err = refusals[" ".join(flags)]
    lines = err.strip().splitlines()
    assert code != 0 and "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("train.py: error: ")
    assert words in lines[0]


REFUSALS = textwrap.dedent("""
    import contextlib, io, json, sys
    import train

    results = {}
    for flags in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = train.main(sys.argv[2:] + flags)
            except SystemExit as exit:
                code = exit.code
        results[" ".join(flags)] = (code, err.getvalue())
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def refusals(data_dir, tmp_path_factory):
    """Each case's exit code and stderr, from one process of 4 devices."""
    cases = [flags for flags, _ in SPLITS]
    args = tiny_args(data_dir, tmp_path_factory.mktemp("refused"),
                     "--val-size", "20", "--eval-batch-size", "20")
    result = subprocess.run(
        [sys.executable, "-c", REFUSALS, json.dumps(cases), *args], cwd=ROOT,
        env=FOUR_DEVICES, capture_output=True, text=True, timeout=600,
        check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(keras.backend.backend() == "jax",
                    reason="the other backends refuse it")
def test_data_parallel_needs_jax(data_dir, tmp_path):
    line = one_error_line(run_script(*tiny_args(data_dir, tmp_path,
                                                "--devices", "2")))
    assert "--devices 2 needs the jax backend" in line
