"""Tests of `BatchRenormalization(track_corrections=True)` and
`corrections()`: the four statistics of `r` and `d` against the float64
reference (tests/reference.py, `correction_statistics` of each step of
Algorithm 1), on the fused and portable paths, with and without virtual
batches and masks, during the warm-up and after it; the reset; the flag in
configs and saved files; the default adding nothing.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

import keras

from batch_renorm import BatchRenormalization
from reference import correction_statistics
from layer_cases import BACKEND
from layer_cases import PATH_IDS
from layer_cases import PATHS
from layer_cases import fast_path_expected
from layer_cases import init_layer
from layer_cases import random_batch
from layer_cases import reference_for
from layer_cases import to_numpy

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("r_dev", "d_dev", "r_clipped", "d_clipped")
# Every step in the warm-up: r_max(k) = 1, d_max(k) = 0.
WARMUP = dict(r_max=2.0, d_max=1.0, warmup_steps=100, r_max_steps=200,
              d_max_steps=150, momentum=0.7)
# Step 0 in the warm-up, then bounds that open at every step: some channels
# clipped, some not.
RAMP = dict(r_max=3.0, d_max=1.5, warmup_steps=1, r_max_steps=3,
            d_max_steps=3, momentum=0.7)
SCHEDULES = {"warmup": WARMUP, "ramp": RAMP}
MEANS = np.array([2.0, -0.5, 0.1])
SCALES = np.array([3.0, 0.6, 1.2])


def batches(rng, shape, axis, steps):
    """Batches whose statistics drift from step to step, so that the moving
    averages (momentum 0.7) lag behind them."""
    return [random_batch(rng, shape, axis, MEANS * (1 + 0.4 * k),
                         SCALES * (1 + 0.3 * k)) for k in range(steps)]


def expected_corrections(ref, xs, group_size=None, masks=None):
    """`corrections()` after training steps on `xs`, from the reference
    (whose state moves on)."""
    per_step = []
    for i, x in enumerate(xs):
        mask = None if masks is None else masks[i]
        if group_size is None:
            out = ref.train(x, mask=mask)
        else:
            out = ref.train_groups(x, group_size, mask=mask)
        per_step.append(correction_statistics(out))
    result = {key: float(np.mean([s[key] for s in per_step])) for key in KEYS}
    result["steps"] = len(xs)
    return result


def assert_corrections(found, expected, rtol=1e-5, atol=1e-6):
    assert set(found) == set(KEYS) | {"steps"}
    assert found["steps"] == expected["steps"]
    assert isinstance(found["steps"], int)
    for key in KEYS:
        assert isinstance(found[key], float), key
        np.testing.assert_allclose(found[key], expected[key], rtol=rtol,
                                   atol=atol, err_msg=key)


def assert_nothing_counted(found):
    assert found["steps"] == 0
    assert all(math.isnan(found[key]) for key in KEYS)


# id, input shape, axis, virtual_batch_size: the fused path takes the
# rank-4 channels-last cases of whole groups (TensorFlow, PyTorch).
CASES = [
    ("rank4", (8, 3, 2, 3), -1, None),
    ("rank4-groups", (8, 3, 2, 3), -1, 4),
    ("rank4-smaller-last-group", (10, 3, 2, 3), -1, 4),
    ("rank2", (12, 3), -1, None),
    ("rank3-channels-first", (6, 3, 4), 1, None),
    ("rank3-channels-first-groups", (7, 3, 4), 1, 3),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=list(SCHEDULES))
@pytest.mark.parametrize("fused", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("shape, axis, group_size", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_corrections_match_reference(shape, axis, group_size, fused,
                                     schedule):
    """Five steps, read and reset after three: the means of each span
    against the reference's, step by step from the same moving statistics."""
    rng = np.random.default_rng(zlib.crc32(repr((shape, axis)).encode()))
    layer = BatchRenormalization(axis=axis, fused=fused,
                                 virtual_batch_size=group_size,
                                 track_corrections=True,
                                 **SCHEDULES[schedule])
    ref = reference_for(layer, init_layer(layer, shape, rng))
    assert layer.uses_fast_path == fast_path_expected(layer, shape, axis)
    assert_nothing_counted(layer.corrections(reset=False))
    xs = batches(rng, shape, axis, 5)
    for x in xs[:3]:
        layer(x, training=True)
    first = expected_corrections(ref, xs[:3], group_size)
    assert_corrections(layer.corrections(reset=False), first)
    assert_corrections(layer.corrections(reset=False), first)  # a read
    assert_corrections(layer.corrections(), first)  # a read, then reset
    assert_nothing_counted(layer.corrections())
    for x in xs[3:]:
        layer(x, training=True)
    second = expected_corrections(ref, xs[3:], group_size)
    assert_corrections(layer.corrections(), second)
    if schedule == "warmup":
        # r = 1, d = 0, and every statistic differs from the moving one.
        for found in (first, second):
            assert found["r_dev"] == found["d_dev"] == 0.0
            assert found["r_clipped"] == found["d_clipped"] == 1.0
    else:
        # The bounds bind for some channels and steps, not all.
        for key in KEYS:
            assert 0 < first[key] + second[key] < 2, key


@pytest.mark.parametrize("fused", PATHS, ids=PATH_IDS)
def test_warmup_clips_only_statistics_that_differ(fused):
    """In the warm-up a channel counts as clipped (strictly outside
    `[1, 1]`, strictly above 0) only where its batch statistic differs from
    the moving one: channel 0 has both equal, channel 1 the mean, channel 2
    neither. Exact: the batch is +-1 around 2 (mean 2, variance 1) and
    epsilon = 0.5625, so sigma_B = 1.25 in float32 as in float64."""
    layer = BatchRenormalization(epsilon=0.5625, fused=fused,
                                 track_corrections=True, **WARMUP)
    layer.build((None, 3))
    layer.moving_mean.assign(np.array([2.0, 2.0, 1.0], "float32"))
    layer.moving_stddev.assign(np.array([1.25, 1.0, 1.0], "float32"))
    ref = reference_for(layer, {"moving_mean": to_numpy(layer.moving_mean),
                                "moving_stddev": to_numpy(layer.moving_stddev)})
    x = np.tile(np.array([[1.0], [3.0]], "float32"), (4, 3))
    layer(x, training=True)
    expected = expected_corrections(ref, [x])
    assert_corrections(layer.corrections(), expected)
    assert expected["r_clipped"] == pytest.approx(2 / 3)
    assert expected["d_clipped"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("group_size", [None, 2], ids=["whole", "groups"])
def test_corrections_with_masks(group_size):
    """Masked positions are left out of the statistics, and a wholly masked
    group out of the means over groups (as out of the moving averages)."""
    rng = np.random.default_rng(3)
    shape = (6, 5, 3)
    layer = BatchRenormalization(virtual_batch_size=group_size,
                                 track_corrections=True, **RAMP)
    ref = reference_for(layer, init_layer(layer, shape, rng))
    xs = batches(rng, shape, -1, 4)
    masks = [rng.random(shape[:-1]) < 0.7 for _ in xs]
    for mask in masks:
        mask[:, 0] = True
    masks[3][:2] = False  # the first group of 2 wholly masked, bounds open
    for x, mask in zip(xs, masks):
        layer(x, training=True, mask=mask)
    with np.errstate(invalid="ignore"):  # the wholly masked group's 0 / 0
        expected = expected_corrections(ref, xs, group_size, masks)
    assert_corrections(layer.corrections(), expected)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("fused", PATHS, ids=PATH_IDS)
def test_corrections_under_mixed_precision(policy, fused,
                                           restore_dtype_policy):
    """Float32 sums of float32 statistics of float16/bfloat16 inputs."""
    keras.config.set_dtype_policy(policy)
    rng = np.random.default_rng(5)
    shape = (8, 3, 2, 3)
    layer = BatchRenormalization(fused=fused, track_corrections=True, **RAMP)
    ref = reference_for(layer, init_layer(layer, shape, rng))
    assert keras.backend.standardize_dtype(
        layer.correction_sums.dtype) == "float32"
    low = "float16" if policy == "mixed_float16" else "bfloat16"
    xs = [keras.ops.cast(x, low) for x in batches(rng, shape, -1, 3)]
    for x in xs:
        layer(x, training=True)
    # The reference sees the inputs as rounded to the compute dtype.
    expected = expected_corrections(
        ref, [to_numpy(keras.ops.cast(x, "float32")) for x in xs])
    assert_corrections(layer.corrections(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("jit_compile", [True, False], ids=["jit", "no-jit"])
def test_corrections_in_compiled_fit(jit_compile):
    """`model.fit` compiled (XLA on TensorFlow and JAX where `jit_compile`;
    on TensorFlow without it, the fused kernel), read and reset at each
    epoch's end by a callback, as a training script would."""
    if BACKEND == "jax" and not jit_compile:
        pytest.skip("JAX's trainer always compiles")
    rng = np.random.default_rng(8)
    shape = (3, 2, 3)
    model = keras.Sequential([keras.Input(shape), BatchRenormalization(
        track_corrections=True, **RAMP)])
    layer = model.layers[0]
    ref = reference_for(layer, init_layer(layer, (None,) + shape, rng))
    model.compile(keras.optimizers.SGD(0.1), "mse",
                  jit_compile=jit_compile and BACKEND != "torch")
    xs = batches(rng, (8,) + shape, -1, 2)
    x = np.concatenate(xs)
    found = []
    read = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: found.append(layer.corrections()))
    model.fit(x, np.zeros_like(x), batch_size=8, epochs=3, shuffle=False,
              verbose=0, callbacks=[read])
    assert len(found) == 3
    for epoch in range(3):  # the moving statistics do not depend on gamma
        assert_corrections(found[epoch], expected_corrections(ref, xs))
    model.evaluate(x, x, verbose=0)  # inference counts nothing
    model.predict(x, verbose=0)
    assert_nothing_counted(layer.corrections())


def test_only_training_calls_count():
    rng = np.random.default_rng(9)
    x = random_batch(rng, (8, 3), -1, MEANS, SCALES)
    layer = BatchRenormalization(track_corrections=True, **RAMP)
    layer(x, training=False)
    layer(x)
    assert_nothing_counted(layer.corrections())
    layer(x[:0], training=True)  # an empty batch has no statistics
    assert_nothing_counted(layer.corrections())
    layer.trainable = False  # frozen: inference
    layer(x, training=True)
    assert_nothing_counted(layer.corrections())
    layer.trainable = True
    layer(x, training=True)
    assert layer.corrections()["steps"] == 1


# ------------------------------------------------ the flag and the variables
def test_default_adds_nothing():
    """No variable (so the same weight files) and no tracking code: a
    default layer has no `correction_sums`, which that code would write."""
    layer = BatchRenormalization()
    layer.build((None, 4, 4, 3))
    assert [v.name for v in layer.variables] == [
        "gamma", "beta", "moving_mean", "moving_stddev", "step"]
    assert layer.correction_sums is None
    assert layer.get_config()["track_corrections"] is False
    x = np.random.default_rng(0).normal(size=(4, 4, 4, 3)).astype("float32")
    layer(x, training=True)
    with pytest.raises(ValueError, match="track_corrections=False"):
        layer.corrections()
    tracking = BatchRenormalization(track_corrections=True)
    tracking.build((None, 4, 4, 3))
    assert [v.name for v in tracking.variables] == [
        "gamma", "beta", "moving_mean", "moving_stddev", "step",
        "correction_sums"]
    assert not tracking.correction_sums.trainable


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_track_corrections_is_validated(value):
    with pytest.raises(ValueError, match=f"track_corrections={value!r}"):
        BatchRenormalization(track_corrections=value)


def test_unbuilt_layer_has_counted_nothing():
    assert_nothing_counted(
        BatchRenormalization(track_corrections=True).corrections())


def test_flag_survives_config_and_saving(tmp_path):
    """The flag goes through get_config/from_config and `.keras` files; the
    sums are per-session state: not saved, zero after loading. Weight files
    are the same with and without tracking, so either loads the other's."""
    rng = np.random.default_rng(10)
    shape = (4, 4, 3)
    layer = BatchRenormalization(track_corrections=True, **RAMP)
    config = layer.get_config()
    assert config["track_corrections"] is True
    assert BatchRenormalization.from_config(config).track_corrections

    def model_of(track):
        return keras.Sequential([keras.Input(shape), BatchRenormalization(
            track_corrections=track, **RAMP)])

    model = model_of(True)
    for x in batches(rng, (8,) + shape, -1, 2):
        model.layers[0](x, training=True)
    assert model.layers[0].corrections(reset=False)["steps"] == 2
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[0].track_corrections
    assert_nothing_counted(loaded.layers[0].corrections())
    # Saving left the original's sums as they were.
    assert model.layers[0].corrections()["steps"] == 2
    saved = {v.name: to_numpy(v) for v in model.layers[0].variables}
    for variable in loaded.layers[0].variables:
        if variable.name != "correction_sums":
            np.testing.assert_array_equal(to_numpy(variable),
                                          saved[variable.name])

    weights = str(tmp_path / "tracking.weights.h5")
    model.save_weights(weights)
    plain = model_of(False)
    plain.load_weights(weights)
    plain_weights = str(tmp_path / "plain.weights.h5")
    plain.save_weights(plain_weights)
    again = model_of(True)
    again.load_weights(plain_weights)
    for other in (plain, again):
        for variable in other.layers[0].variables:
            if variable.name != "correction_sums":
                np.testing.assert_array_equal(to_numpy(variable),
                                              saved[variable.name])
    with open(weights, "rb") as a, open(plain_weights, "rb") as b:
        assert len(a.read()) == len(b.read())


# ----------------------------------------------------- several devices
MIRRORED = textwrap.dedent("""
    import json
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    from batch_renorm import BatchRenormalization

    rng = np.random.default_rng(0)
    x = rng.normal(1, 2, size=(8, 6, 6, 3)).astype("float32")
    x[4:] += 2  # the replicas' halves differ
    CLIP = dict(r_max=3.0, d_max=2.0, warmup_steps=0, r_max_steps=0,
                d_max_steps=0, momentum=0.5)

    def corrections(strategy, **kwargs):
        with (strategy or tf.distribute.get_strategy()).scope():
            model = keras.Sequential([keras.Input((6, 6, 3)),
                BatchRenormalization(track_corrections=True, **CLIP,
                                     **kwargs)])
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        found = []
        for _ in range(2):
            model.fit(x * (1 + len(found)), x, batch_size=8, epochs=1,
                      verbose=0, shuffle=False)
            found.append(model.layers[0].corrections())
        return found

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    print(json.dumps({
        "groups": corrections(None, virtual_batch_size=4),
        "whole": corrections(None),
        "per_replica": corrections(mirrored),
        "synchronized": corrections(mirrored, synchronized=True)}))
""")

DATA_PARALLEL = textwrap.dedent("""
    import json
    import numpy as np, keras, jax
    from batch_renorm import BatchRenormalization

    assert len(jax.devices()) == 4, jax.devices()
    rng = np.random.default_rng(0)
    x = rng.normal(1, 2, size=(16, 4, 4, 3)).astype("float32")
    x[8:] += 2  # the devices' quarters differ
    CLIP = dict(r_max=3.0, d_max=2.0, warmup_steps=0, r_max_steps=0,
                d_max_steps=0, momentum=0.5)

    def corrections(distribution, **kwargs):
        keras.distribution.set_distribution(distribution)
        model = keras.Sequential([keras.Input((4, 4, 3)),
            BatchRenormalization(track_corrections=True, **CLIP, **kwargs)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        found = []
        for _ in range(2):
            model.fit(x * (1 + len(found)), x, batch_size=16, epochs=1,
                      verbose=0, shuffle=False)
            found.append(model.layers[0].corrections())
        return found

    parallel = keras.distribution.DataParallel()
    print(json.dumps({
        "whole": corrections(None),
        "groups": corrections(None, virtual_batch_size=4),
        "parallel": corrections(parallel),
        "parallel_groups": corrections(parallel, virtual_batch_size=4)}))
""")


def run_json(script, **env):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    result = subprocess.run([sys.executable, "-c", script], env=env,
                            capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_same_corrections(a, b):
    for found, expected in zip(a, b, strict=True):
        assert_corrections(found, expected)


@pytest.mark.skipif(BACKEND != "tensorflow",
                    reason="tf.distribute: the tensorflow pass")
def test_corrections_under_mirrored_strategy():
    """Two replicas of 4 examples: per replica, the corrections of one
    device's groups of 4 (the replicas' sums mean-aggregated); with
    `synchronized=True`, those of the whole batch."""
    found = run_json(MIRRORED, KERAS_BACKEND="tensorflow")
    assert found["groups"][0]["steps"] == 1
    assert found["groups"] != found["whole"]
    assert_same_corrections(found["per_replica"], found["groups"])
    assert_same_corrections(found["synchronized"], found["whole"])


@pytest.mark.skipif(BACKEND != "jax",
                    reason="a JAX subprocess with 4 devices: the jax pass")
def test_corrections_under_data_parallel():
    """JAX's DataParallel on 4 devices: the whole batch's corrections, as on
    one device; with groups of the per-device batch, those of the groups."""
    found = run_json(DATA_PARALLEL, KERAS_BACKEND="jax",
                     XLA_FLAGS="--xla_force_host_platform_device_count=4")
    assert found["groups"] != found["whole"]
    assert_same_corrections(found["parallel"], found["whole"])
    assert_same_corrections(found["parallel_groups"], found["groups"])
