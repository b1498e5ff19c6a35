"""Hostile inputs: where BatchNormalization stays finite, so must this layer.

Each defect found in a review of hostile inputs has a test here (float64
policies, non-finite values at masked positions, large magnitudes with a small spread, a zero moving
standard deviation), run on every path of the layer (the backend's fused
kernel where it applies, and the portable `keras.ops` path), plus the
neighbouring cases: non-finite unmasked inputs, empty batches, a batch of
one, reduced-precision policies, every rank and axis. Expected numbers come
from the float64 reference (tests/reference.py) or from Keras's own
BatchNormalization.
"""

import numpy as np
import pytest

import keras
from keras import ops

from batch_renorm import BatchRenormalization
from layer_cases import BACKEND
from layer_cases import FIXED_CLIP
from layer_cases import PATH_IDS
from layer_cases import PATHS
from layer_cases import assert_close
from layer_cases import init_layer
from layer_cases import reference_for
from layer_cases import to_numpy
from layer_cases import train_call_with_grads

# r_max = 1, d_max = 0 from the first step: batch normalization exactly.
TRIVIAL = dict(r_max=1.0, d_max=0.0, warmup_steps=0, r_max_steps=0,
               d_max_steps=0)


def assert_relative(actual, expected, rtol, err_msg=""):
    """|actual - expected| <= rtol * max|expected|, elementwise: a tolerance
    that scales with the numbers, however small or large they are."""
    actual = np.asarray(to_numpy(actual), np.float64)
    expected = np.asarray(expected, np.float64)
    assert np.all(np.isfinite(actual)), f"non-finite values {err_msg}"
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale,
                               err_msg=err_msg)


def matching_batch_norm(brn, shape):
    """A Keras BatchNormalization with `brn`'s arguments and variables."""
    bn = keras.layers.BatchNormalization(
        axis=brn.axis, momentum=brn.momentum, epsilon=brn.epsilon,
        center=brn.center, scale=brn.scale, dtype=brn.dtype_policy)
    bn.build(shape)
    if brn.scale:
        bn.gamma.assign(to_numpy(brn.gamma))
    if brn.center:
        bn.beta.assign(to_numpy(brn.beta))
    bn.moving_mean.assign(to_numpy(brn.moving_mean))
    bn.moving_variance.assign(to_numpy(brn.moving_stddev) ** 2 - brn.epsilon)
    return bn


def _float64_available():
    if BACKEND != "jax":
        return True
    import jax

    return bool(jax.config.jax_enable_x64)


# JAX computes in float32 unless 64-bit mode is on (JAX_ENABLE_X64).
needs_float64 = pytest.mark.skipif(not _float64_available(),
                                   reason="JAX without 64-bit mode")


# ------------------------------------------- defect 1: float64 dtype policy
@needs_float64
@pytest.mark.parametrize("fused", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("shape", [(6, 3, 2, 4), (7, 3)], ids=["rank4", "rank2"])
def test_float64_policy_trains_eagerly(shape, fused):
    rng = np.random.default_rng(0)
    layer = BatchRenormalization(dtype="float64", momentum=0.8, fused=fused,
                                 **FIXED_CLIP)
    ref = reference_for(layer, init_layer(layer, shape, rng))
    x = rng.normal(2.0, 3.0, shape)
    w = rng.normal(size=shape)
    for _ in range(2):
        y, dx, grads = train_call_with_grads(layer, x, w)
        expected = ref.train(x, g_y=w)
        assert y.dtype == np.float64
        # Float64 statistics: far closer than float32 could be.
        assert_close(y, expected["y"], rtol=1e-6, atol=1e-6)
        assert_close(dx, expected["dx"], rtol=1e-5, atol=1e-5)
        assert_close(grads["gamma"], expected["dgamma"], 1e-5, 1e-5)
        assert_close(layer.moving_stddev, ref.moving_stddev, 1e-6, 1e-6)


def test_float64_policy_trains_in_fit():
    rng = np.random.default_rng(1)
    model = keras.Sequential([
        keras.Input((4, 4, 3), dtype="float64"),
        BatchRenormalization(dtype="float64", **FIXED_CLIP),
    ])
    model.compile("sgd", "mse")
    x = rng.normal(size=(8, 4, 4, 3))
    history = model.fit(x, x, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert int(to_numpy(model.layers[0].step)) == 2


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's kernel")
def test_fused_true_with_float64_on_tensorflow_is_a_clear_error():
    layer = BatchRenormalization(dtype="float64", fused=True)
    with pytest.raises(ValueError, match=r"fused=True.*float64"):
        layer.build((2, 3, 3, 4))


# --------------------------- defect 2: non-finite values at masked positions
@pytest.mark.parametrize("fused", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e38],
                         ids=["nan", "inf", "-inf", "3e38"])
@pytest.mark.parametrize("shape", [(4, 6, 3), (3, 4, 2, 3)],
                         ids=["rank3", "rank4"])
def test_masked_positions_never_reach_the_statistics(shape, bad, fused):
    rng = np.random.default_rng(2)
    layer = BatchRenormalization(momentum=0.8, fused=fused, **FIXED_CLIP)
    ref = reference_for(layer, init_layer(layer, shape, rng))
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    mask = rng.random(shape[:-1]) < 0.6
    mask.reshape(-1)[0] = True
    clean = np.where(mask[..., None], x, 0.0).astype("float32")
    x[~mask] = bad
    y = to_numpy(layer(x, training=True, mask=ops.convert_to_tensor(mask)))
    expected = ref.train(clean, mask=mask)
    assert_close(y[mask], expected["y"][mask])
    assert_close(layer.moving_mean, ref.moving_mean)
    assert_close(layer.moving_stddev, ref.moving_stddev)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_masked_non_finite_values_as_batch_normalization(bad):
    rng = np.random.default_rng(3)
    shape = (4, 5, 3)
    brn = BatchRenormalization(momentum=0.5, **TRIVIAL)
    init_layer(brn, shape, rng)
    bn = matching_batch_norm(brn, shape)
    x = rng.normal(size=shape).astype("float32")
    mask = rng.random(shape[:-1]) < 0.7
    mask[0, 0] = True
    x[~mask] = bad
    mask_t = ops.convert_to_tensor(mask)
    y_brn = to_numpy(brn(x, training=True, mask=mask_t))
    y_bn = to_numpy(bn(x, training=True, mask=mask_t))
    assert np.all(np.isfinite(y_bn[mask]))
    assert_close(y_brn[mask], y_bn[mask], 1e-5, 1e-5)
    assert_close(brn.moving_mean, bn.moving_mean, 1e-6, 1e-6)


# --------------------- defect 3: large magnitudes with a small spread
LARGE_SHAPES = [((64, 3), -1), ((8, 6, 3), -1), ((4, 3, 3, 3), -1),
                ((2, 3, 2, 3, 3), -1), ((4, 3, 5, 3), 1)]


# The portable path's two formulations of the statistics, whichever this
# CPU's rule picks (`_one_read_moments`): both are tested everywhere.
MOMENTS = [True, False]
MOMENTS_IDS = ["one-read", "two-read"]


@pytest.mark.parametrize("one_read", MOMENTS, ids=MOMENTS_IDS)
@pytest.mark.parametrize("fused", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("shape, axis", LARGE_SHAPES,
                         ids=["rank2", "rank3", "rank4", "rank5", "rank4-axis1"])
@pytest.mark.parametrize("center, spread", [(3e19, 1e18), (-3e19, 1e18),
                                            (2e20, 1e18)],
                         ids=["3e19", "-3e19", "2e20"])
def test_large_magnitude_small_spread(shape, axis, center, spread, fused,
                                      one_read):
    rng = np.random.default_rng(4)
    layer = BatchRenormalization(axis=axis, momentum=0.8, fused=fused,
                                 **FIXED_CLIP)
    layer._one_read = one_read
    ref = reference_for(layer, init_layer(layer, shape, rng))
    # x^2 overflows float32 (beyond 1.8e19), (x - mean)^2 does not; the
    # spread is far above float32's rounding of x.
    x = (center + spread * rng.normal(size=shape)).astype("float32")
    w = rng.normal(size=shape).astype("float32")
    y, dx, grads = train_call_with_grads(layer, x, w)
    expected = ref.train(x, g_y=w)
    assert_relative(y, expected["y"], 1e-4, "y")
    # y = x * a + b and its gradient cancel by |mean| / spread (30 to 200)
    # in float32 (TensorFlow's rank-2 two-read gradient: 2.5e-3 of dx).
    assert_relative(dx, expected["dx"], 1e-2, "dx")
    assert_relative(grads["gamma"], expected["dgamma"], 1e-3, "dgamma")
    assert_relative(layer.moving_mean, ref.moving_mean, 1e-5, "mean")
    assert_relative(layer.moving_stddev, ref.moving_stddev, 1e-4, "stddev")


@pytest.mark.skipif(BACKEND == "torch", reason="Keras's torch moments, "
                    "E[x^2] - E[x]^2, overflow here (BatchNormalization NaN)")
def test_large_magnitude_as_batch_normalization():
    rng = np.random.default_rng(5)
    shape = (32, 4)
    brn = BatchRenormalization(momentum=0.5, **TRIVIAL)
    init_layer(brn, shape, rng)
    bn = matching_batch_norm(brn, shape)
    x = (3e19 + 1e18 * rng.normal(size=shape)).astype("float32")
    y_bn = to_numpy(bn(x, training=True))
    assert np.all(np.isfinite(y_bn))
    assert_close(brn(x, training=True), y_bn, 1e-4, 1e-4)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's XLA")
def test_large_magnitude_under_tensorflow_xla():
    import tensorflow as tf

    rng = np.random.default_rng(6)
    shape = (4, 3, 3, 3)
    layer = BatchRenormalization(momentum=0.8, **FIXED_CLIP)
    ref = reference_for(layer, init_layer(layer, shape, rng))
    x = (3e19 + 1e18 * rng.normal(size=shape)).astype("float32")
    step = tf.function(lambda x: layer(x, training=True), jit_compile=True)
    assert_relative(step(tf.constant(x)), ref.train(x)["y"], 1e-4)
    assert_relative(layer.moving_stddev, ref.moving_stddev, 1e-4)


# ------------------------------- defect 4: a zero moving standard deviation
@pytest.mark.parametrize("fused", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("shape", [(4, 2, 2, 3), (8, 3)], ids=["rank4", "rank2"])
def test_zero_moving_stddev_with_trivial_bounds_is_batch_norm(shape, fused):
    rng = np.random.default_rng(7)
    brn = BatchRenormalization(moving_stddev_initializer="zeros", fused=fused,
                               momentum=0.5, **TRIVIAL)
    bn = keras.layers.BatchNormalization(momentum=0.5)
    x = rng.normal(size=shape).astype("float32")
    # Channel 0's batch mean is exactly the moving mean (0): d = 0 / 0.
    x[..., 0] = np.reshape([1.0, -1.0] * (x[..., 0].size // 2), x[..., 0].shape)
    w = rng.normal(size=shape).astype("float32")
    brn.build(shape)
    bn.build(shape)
    y_brn, dx_brn, _ = train_call_with_grads(brn, x, w)
    y_bn, dx_bn, _ = train_call_with_grads(bn, x, w)
    assert np.all(np.isfinite(y_brn))
    assert_close(y_brn, y_bn, 1e-5, 1e-5)
    assert_close(dx_brn, dx_bn, 1e-4, 1e-4)
    assert_close(brn.moving_mean, bn.moving_mean, 1e-6, 1e-6)


@pytest.mark.parametrize("fused", PATHS, ids=PATH_IDS)
def test_zero_moving_stddev_clips_to_the_bounds(fused):
    # sigma = 0: r = sigma_B / 0 clips to r_max; d = 0 / 0 where the means
    # agree (no correction: 0), +-inf clipped to +-d_max where they differ.
    rng = np.random.default_rng(8)
    shape = (4, 2, 2, 3)
    layer = BatchRenormalization(moving_stddev_initializer="zeros",
                                 fused=fused, **FIXED_CLIP)
    layer.build(shape)
    x = rng.normal(size=shape).astype("float32")
    # Channel 0 is 0 (its batch mean is exactly the moving mean, 0, in any
    # summation order), so its output is gamma * d + beta = d.
    x[..., 0] = 0.0
    x[..., 1] += 3.0
    x[..., 2] -= 3.0
    y = to_numpy(layer(x, training=True))
    mean = x.mean(axis=(0, 1, 2))
    x_hat = (x - mean) / np.sqrt(x.var(axis=(0, 1, 2)) + layer.epsilon)
    d = np.array([0.0, 0.5, -0.5])
    assert_close(y, x_hat * 1.5 + d, 1e-5, 1e-5)


# ------------------------------------------------------ neighbouring cases
@pytest.mark.parametrize("fused", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("shape", [(4, 2, 2, 3), (6, 3)], ids=["rank4", "rank2"])
def test_unmasked_non_finite_values_as_batch_normalization(shape, bad, fused):
    # A NaN or inf in channel 1 spoils that channel, as in batch
    # normalization, and no other.
    rng = np.random.default_rng(9)
    brn = BatchRenormalization(momentum=0.5, fused=fused, **TRIVIAL)
    init_layer(brn, shape, rng)
    bn = matching_batch_norm(brn, shape)
    x = rng.normal(size=shape).astype("float32")
    x.reshape(-1, shape[-1])[1, 1] = bad
    y_brn = to_numpy(brn(x, training=True))
    y_bn = to_numpy(bn(x, training=True))
    assert not np.any(np.isfinite(y_bn[..., 1]))
    assert not np.any(np.isfinite(y_brn[..., 1]))
    assert not np.isfinite(to_numpy(brn.moving_mean)[1])
    keep = [0, 2]
    assert_close(y_brn[..., keep], y_bn[..., keep], 1e-5, 1e-5)
    assert_close(to_numpy(brn.moving_mean)[keep],
                 to_numpy(bn.moving_mean)[keep], 1e-6, 1e-6)


@pytest.mark.parametrize("fused", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("shape", [(0, 3), (0, 2, 2, 3), (3, 0, 2, 3)],
                         ids=["rank2", "rank4", "rank4-empty-height"])
def test_empty_batch_leaves_the_statistics_alone(shape, fused):
    rng = np.random.default_rng(10)
    layer = BatchRenormalization(fused=fused, **FIXED_CLIP)
    init_layer(layer, shape, rng)
    before = {v.name: to_numpy(v).copy() for v in layer.non_trainable_variables}
    x = np.zeros(shape, "float32")
    y, dx, grads = train_call_with_grads(layer, x, x)
    assert y.shape == shape and dx.shape == shape
    for name in ("gamma", "beta"):
        np.testing.assert_array_equal(grads[name], 0.0)
    np.testing.assert_array_equal(layer.moving_mean, before["moving_mean"])
    np.testing.assert_array_equal(layer.moving_stddev, before["moving_stddev"])
    assert int(to_numpy(layer.step)) == 1


@pytest.mark.parametrize("fused", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("shape", [(1, 3), (1, 1, 1, 3), (1, 2, 2, 3)],
                         ids=["rank2", "rank4-one-value", "rank4"])
def test_batch_of_one(shape, fused):
    rng = np.random.default_rng(11)
    layer = BatchRenormalization(momentum=0.7, fused=fused, **FIXED_CLIP)
    ref = reference_for(layer, init_layer(layer, shape, rng))
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    w = rng.normal(size=shape).astype("float32")
    for _ in range(2):
        y, dx, grads = train_call_with_grads(layer, x, w)
        expected = ref.train(x, g_y=w)
        assert_close(y, expected["y"], 1e-5, 1e-5)
        assert_close(dx, expected["dx"])
        assert_close(grads["gamma"], expected["dgamma"])
        assert_close(layer.moving_mean, ref.moving_mean, 1e-6, 1e-6)
        assert_close(layer.moving_stddev, ref.moving_stddev, 1e-6, 1e-6)


@pytest.mark.parametrize("fused", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("policy", ["float16", "bfloat16"])
def test_reduced_precision_policies(policy, fused, restore_dtype_policy):
    # Pure (not mixed) policies: the variables take the policy's dtype, as
    # BatchNormalization's do; statistics in float32, outputs in the
    # policy's dtype.
    rng = np.random.default_rng(12)
    shape = (8, 3, 2, 4)
    layer = BatchRenormalization(dtype=policy, momentum=0.8, fused=fused,
                                 **FIXED_CLIP)
    init_layer(layer, shape, rng)
    bn = keras.layers.BatchNormalization(dtype=policy)
    bn.build(shape)
    assert layer.moving_mean.dtype == bn.moving_mean.dtype
    # The reference starts from the values as the variables hold them.
    ref = reference_for(layer, {
        name: to_numpy(getattr(layer, name)).astype("float64")
        for name in ("gamma", "beta", "moving_mean", "moving_stddev")})
    x = ops.cast(rng.normal(50.0, 2.0, shape).astype("float32"), policy)
    y = layer(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == policy
    expected = ref.train(to_numpy(ops.cast(x, "float32")).astype("float64"))
    resolution = 1e-3 if policy == "float16" else 8e-3
    assert_close(ops.cast(y, "float32"), expected["y"], resolution, resolution)
    assert_close(ops.cast(layer.moving_mean, "float32"), ref.moving_mean,
                 resolution, resolution)
    assert_close(ops.cast(layer.moving_stddev, "float32"), ref.moving_stddev,
                 resolution, resolution)


RANK_AXES = [(rank, axis) for rank in (2, 3, 4, 5)
             for axis in range(-rank, rank)]


@pytest.mark.parametrize("fused", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("rank, axis", RANK_AXES,
                         ids=[f"rank{r}-axis{a}" for r, a in RANK_AXES])
@pytest.mark.parametrize("one_read", MOMENTS, ids=MOMENTS_IDS)
def test_every_rank_and_axis(rank, axis, fused, one_read):
    rng = np.random.default_rng(rank * 10 + axis)
    shape = [2, 3, 2, 3, 2][:rank]
    shape[axis] = 4
    shape = tuple(shape)
    layer = BatchRenormalization(axis=axis, momentum=0.8, fused=fused,
                                 **FIXED_CLIP)
    layer._one_read = one_read
    ref = reference_for(layer, init_layer(layer, shape, rng))
    per_channel = [1] * rank
    per_channel[axis] = 4
    x = (rng.normal(size=shape) * np.reshape([0.3, 1.0, 2.0, 5.0], per_channel)
         + np.reshape([3.0, -1.0, 0.0, 2.0], per_channel)).astype("float32")
    w = rng.normal(size=shape).astype("float32")
    y, dx, grads = train_call_with_grads(layer, x, w)
    expected = ref.train(x, g_y=w)
    assert_close(y, expected["y"])
    assert_close(dx, expected["dx"])
    assert_close(grads["gamma"], expected["dgamma"])
    assert_close(grads["beta"], expected["dbeta"])
    assert_close(layer.moving_stddev, ref.moving_stddev)
    assert_close(layer(x), ref.infer(x))
