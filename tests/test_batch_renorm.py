"""Tests of `BatchRenormalization` against the float64 reference.

The reference (tests/reference.py) is an independent NumPy implementation of
Algorithm 1 of Ioffe (2017) with its analytic backward pass; every expected
number in this file comes from it or from another Keras layer.
"""

import numpy as np
import pytest

import keras
from keras import ops

from batch_renorm import BatchRenormalization
from batch_renorm import has_fast_path
from batch_renorm import renorm_bounds
from reference import RenormReference
from reference import numeric_gradients
from reference import schedule_bounds

from layer_cases import BACKEND
from layer_cases import PATHS
from layer_cases import PATH_IDS
from layer_cases import fast_path_expected
from layer_cases import FIXED_CLIP
from layer_cases import NO_CLIP
from layer_cases import to_numpy
from layer_cases import assert_close
from layer_cases import snapshot
from layer_cases import assert_unchanged
from layer_cases import train_call_with_grads
from layer_cases import init_layer
from layer_cases import reference_for
from layer_cases import random_batch


REFERENCE_CASES = [
    (
        "rank2-last-clipped",
        (16, 5),
        -1,
        dict(momentum=0.9, **FIXED_CLIP),
        "some",
        [-4.0, -1.0, 0.2, 1.5, 4.0],
        [0.2, 0.8, 1.0, 3.0, 6.0],
    ),
    (
        "rank4-last-clipped",
        (4, 3, 2, 4),
        -1,
        dict(momentum=0.8, epsilon=1e-2, **FIXED_CLIP),
        "some",
        [3.0, -0.1, 0.3, -5.0],
        [4.0, 1.1, 0.25, 1.0],
    ),
    (
        "rank4-first-clipped",
        (4, 5, 3, 2),
        1,
        dict(**FIXED_CLIP),
        "some",
        [-3.0, 0.0, 0.4, 2.0, 6.0],
        [0.1, 1.0, 5.0, 1.2, 2.0],
    ),
    (
        "rank2-last-unclipped",
        (12, 4),
        -1,
        dict(momentum=0.7, **NO_CLIP),
        "none",
        [-2.0, 0.5, 1.0, 3.0],
        [0.3, 0.6, 2.0, 4.0],
    ),
    (
        "rank4-first-unclipped",
        (3, 4, 2, 5),
        1,
        dict(momentum=0.9, epsilon=1e-2, **NO_CLIP),
        "none",
        [1.0, -3.0, 0.5, 2.0],
        [3.0, 0.5, 0.4, 2.0],
    ),
    (
        "rank3-first-scheduled",
        (6, 3, 4),
        1,
        dict(
            momentum=0.9,
            r_max=2.0,
            d_max=1.0,
            warmup_steps=2,
            r_max_steps=4,
            d_max_steps=5,
        ),
        "some",
        [2.0, -1.0, 0.3],
        [3.0, 0.3, 1.2],
    ),
    (
        "rank2-jump-at-warmup",
        (10, 3),
        -1,
        dict(
            momentum=0.9,
            r_max=2.0,
            d_max=1.0,
            warmup_steps=3,
            r_max_steps=0,
            d_max_steps=0,
        ),
        "some",
        [2.0, -0.5, 0.1],
        [4.0, 0.4, 1.0],
    ),
    (
        "rank3-last-clipped-no-scale",
        (5, 4, 3),
        -1,
        dict(scale=False, momentum=0.9, **FIXED_CLIP),
        "some",
        [3.0, -0.2, 1.0],
        [0.2, 1.0, 4.0],
    ),
    (
        "rank3-last-unclipped-no-center",
        (5, 4, 3),
        -1,
        dict(center=False, momentum=0.9, **NO_CLIP),
        "none",
        [3.0, -0.4, 1.0],
        [0.2, 1.0, 4.0],
    ),
]


@pytest.mark.parametrize("fused", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize(
    "shape, axis, kwargs, clipping, means, scales",
    [case[1:] for case in REFERENCE_CASES],
    ids=[case[0] for case in REFERENCE_CASES],
)
def test_training_matches_reference(
    shape, axis, kwargs, clipping, means, scales, fused
):
    rng = np.random.default_rng(abs(hash((shape, axis))) % 2**32)
    layer = BatchRenormalization(axis=axis, fused=fused, **kwargs)
    ref = reference_for(layer, init_layer(layer, shape, rng))
    assert layer.uses_fast_path == fast_path_expected(layer, shape, axis)
    r_clipped, d_clipped, r_dev, d_dev = [], [], [], []
    for k in range(6):
        # The statistics drift a little from step to step.
        x = random_batch(
            rng,
            shape,
            axis,
            np.asarray(means) * (1 + 0.1 * k),
            np.asarray(scales) * (1 + 0.05 * k),
        )
        w = rng.normal(size=shape).astype("float32")

        r_max, d_max = (float(b) for b in to_numpy(layer.bounds()))
        assert_close([r_max, d_max], ref.bounds(), rtol=1e-6, atol=1e-6)
        assert_close(
            [layer.current_r_max(), layer.current_d_max()],
            ref.bounds(),
            rtol=1e-6,
            atol=1e-6,
        )

        y, dx, dvars = train_call_with_grads(layer, x, w)
        expected = ref.train(x, g_y=w)
        msg = f"step {k}"
        assert y.dtype == np.float32
        assert_close(y, expected["y"], err_msg=msg)
        assert_close(dx, expected["dx"], err_msg=msg)
        if layer.scale:
            assert_close(dvars["gamma"], expected["dgamma"], err_msg=msg)
        else:
            assert "gamma" not in dvars and layer.gamma is None
        if layer.center:
            assert_close(dvars["beta"], expected["dbeta"], err_msg=msg)
        else:
            assert "beta" not in dvars and layer.beta is None
        assert_close(layer.moving_mean, ref.moving_mean, err_msg=msg)
        assert_close(layer.moving_stddev, ref.moving_stddev, err_msg=msg)
        assert int(to_numpy(layer.step)) == ref.step == k + 1

        r_max, d_max = expected["r_max"], expected["d_max"]
        r_clipped.append(
            (expected["r_unclipped"] > r_max)
            | (expected["r_unclipped"] < 1 / r_max)
        )
        d_clipped.append(np.abs(expected["d_unclipped"]) > d_max)
        r_dev.append(np.abs(expected["r"] - 1))
        d_dev.append(np.abs(expected["d"]))

    # The test is not vacuous: r and d were (or were not) clipped as intended,
    # and were far from the batch normalization values r = 1, d = 0.
    r_clipped, d_clipped = np.array(r_clipped), np.array(d_clipped)
    if clipping == "some":
        assert r_clipped.any() and d_clipped.any()
        assert (np.max(r_dev) > 0.1) and (np.max(d_dev) > 0.1)
    else:
        assert not r_clipped.any() and not d_clipped.any()
        assert np.max(r_dev) > 0.5 and np.max(d_dev) > 0.5


def test_statistics_of_channels_with_large_mean_and_small_spread():
    """The batch variance is not lost to cancellation (it was on PyTorch)."""
    rng = np.random.default_rng(9)
    layer = BatchRenormalization(momentum=0.5, **FIXED_CLIP)
    ref = reference_for(layer, init_layer(layer, (32, 3), rng, moving=False))
    for k in range(3):
        x = random_batch(rng, (32, 3), -1, [255.3, 500.0, 0.0], [1e-3, 1e-3, 1])
        y = to_numpy(layer(x, training=True))
        expected = ref.train(x)
        assert np.all(np.isfinite(y))
        assert_close(layer.moving_stddev, ref.moving_stddev, err_msg=f"{k}")
        assert_close(y, expected["y"], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("fused", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("shape", [(256, 4), (8, 4, 8, 4)], ids=["rank2", "rank4"])
def test_batch_variance_is_exact_where_one_read_would_cancel(shape, fused):
    """`E[x^2] - E[x]^2` in float32 would lose the variance of channels whose
    mean is 100 to 10,000 times their spread; the layer's batch variance
    (read through `moving_stddev` with momentum 0 and a tiny epsilon) is the
    float64 one to 1e-3, and as exact on an ordinary channel."""
    rng = np.random.default_rng(12)
    x = random_batch(rng, shape, -1, [255.3, 500.0, 1e4, 0.1],
                     [1.0, 0.5, 1.0, 2.0])
    layer = BatchRenormalization(momentum=0.0, epsilon=1e-9, fused=fused,
                                 **FIXED_CLIP)
    # The one-read statistics, whichever formulation this CPU's rule picks.
    layer._one_read = True
    layer(x, training=True)
    expected = np.sqrt(np.var(x.astype("float64").reshape(-1, shape[-1]),
                             axis=0) + 1e-9)
    np.testing.assert_allclose(to_numpy(layer.moving_stddev), expected,
                               rtol=1e-3)


@pytest.mark.parametrize("fused", PATHS, ids=PATH_IDS)
def test_recomputed_variance_keeps_algorithm_1_and_its_gradient(fused):
    """Channels with a mean 50 times their spread take the second read of
    the batch variance (E[x^2] would be 2500 times it); outputs, gradients
    and state still follow the float64 reference."""
    rng = np.random.default_rng(13)
    shape = (8, 4, 4, 3)
    layer = BatchRenormalization(momentum=0.7, fused=fused, **FIXED_CLIP)
    layer._one_read = True  # as above
    values = init_layer(layer, shape, rng)
    values["moving_mean"] = np.array([50.0, -40.0, 0.0])
    layer.moving_mean.assign(values["moving_mean"].astype("float32"))
    ref = reference_for(layer, values)
    for k in range(2):
        x = random_batch(rng, shape, -1, [50.5, -40.2, 0.1], [1.0, 0.8, 1.5])
        w = rng.normal(size=shape).astype("float32")
        y, dx, dvars = train_call_with_grads(layer, x, w)
        expected = ref.train(x, g_y=w)
        assert_close(y, expected["y"], 1e-3, 1e-3, err_msg=f"step {k}")
        assert_close(dx, expected["dx"], 1e-3, 1e-3, err_msg=f"step {k}")
        assert_close(dvars["gamma"], expected["dgamma"], 1e-3, 1e-3)
        assert_close(dvars["beta"], expected["dbeta"], 1e-3, 1e-3)
        assert_close(layer.moving_stddev, ref.moving_stddev, 1e-4, 1e-4)


@pytest.mark.parametrize(
    "shape, axis", [((6, 3), -1), ((3, 2, 2, 2), 1)], ids=["rank2", "rank4"]
)
def test_reference_backward_matches_finite_differences(shape, axis):
    """The reference's analytic gradient, checked numerically in float64."""
    rng = np.random.default_rng(7)
    channels = shape[axis]
    ref = RenormReference(
        channels,
        axis=axis,
        gamma=rng.uniform(0.5, 2.0, channels),
        beta=rng.normal(size=channels),
        moving_mean=rng.normal(size=channels),
        moving_stddev=rng.uniform(0.5, 2.0, channels),
        epsilon=1e-2,
        **FIXED_CLIP,
    )
    x = random_batch(rng, shape, axis, [3.0] * channels, [2.0] * channels)
    g_y = rng.normal(size=shape)
    numeric = numeric_gradients(ref, x, g_y)
    analytic = ref.copy().train(x, g_y=g_y)
    assert (analytic["r"] != analytic["r_unclipped"]).any() or (
        analytic["d"] != analytic["d_unclipped"]
    ).any()
    for key in ("dx", "dgamma", "dbeta"):
        np.testing.assert_allclose(
            analytic[key], numeric[key], rtol=1e-6, atol=1e-7, err_msg=key
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # the default schedule, in its warm-up
        dict(
            r_max=1.0, d_max=0.0, warmup_steps=0, r_max_steps=0, d_max_steps=0
        ),
    ],
    ids=["default-warmup", "fixed-1-0"],
)
@pytest.mark.parametrize(
    "shape, axis", [((8, 5), -1), ((4, 3, 2, 2), 1)], ids=["rank2", "rank4"]
)
def test_equals_batch_normalization_with_trivial_bounds(kwargs, shape, axis):
    rng = np.random.default_rng(3)
    brn = BatchRenormalization(axis=axis, momentum=0.9, epsilon=1e-2, **kwargs)
    bn = keras.layers.BatchNormalization(axis=axis, momentum=0.9, epsilon=1e-2)
    init_layer(brn, shape, rng)
    bn.build(shape)
    bn.gamma.assign(brn.gamma)
    bn.beta.assign(brn.beta)
    bn.moving_mean.assign(brn.moving_mean)
    channels = shape[axis]
    for _ in range(4):
        assert brn.current_r_max() == 1.0 and brn.current_d_max() == 0.0
        x = random_batch(
            rng, shape, axis, rng.normal(0, 3, channels), [3.0] * channels
        )
        w = rng.normal(size=shape).astype("float32")
        y_brn, dx_brn, d_brn = train_call_with_grads(brn, x, w)
        y_bn, dx_bn, d_bn = train_call_with_grads(bn, x, w)
        assert_close(y_brn, y_bn, rtol=1e-5, atol=1e-5)
        assert_close(dx_brn, dx_bn, rtol=1e-4, atol=1e-4)
        assert_close(d_brn["gamma"], d_bn["gamma"], rtol=1e-4, atol=1e-4)
        assert_close(d_brn["beta"], d_bn["beta"], rtol=1e-4, atol=1e-4)
        assert_close(brn.moving_mean, bn.moving_mean, rtol=1e-6, atol=1e-6)
    # Not vacuous: without the clipping, r and d would have been far from 1, 0.
    ref = reference_for(brn, {"moving_mean": to_numpy(brn.moving_mean)})
    ref.moving_stddev = to_numpy(brn.moving_stddev).astype("float64")
    stats = ref.train(x)
    assert np.max(np.abs(stats["r_unclipped"] - 1)) > 0.5
    assert np.max(np.abs(stats["d_unclipped"])) > 0.5


SCHEDULES = [
    dict(r_max=3.0, d_max=5.0, warmup_steps=10, r_max_steps=30, d_max_steps=20),
    dict(r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=0, d_max_steps=0),
    dict(r_max=2.0, d_max=1.0, warmup_steps=10, r_max_steps=0, d_max_steps=0),
    dict(r_max=2.0, d_max=1.0, warmup_steps=10, r_max_steps=10, d_max_steps=25),
    dict(r_max=4.0, d_max=2.0, warmup_steps=0, r_max_steps=8, d_max_steps=0),
    dict(),  # the defaults
]
STEPS = [0, 1, 5, 9, 10, 11, 15, 19, 20, 21, 25, 29, 30, 31, 100, 4999, 5000]
STEPS += [5001, 10000, 25000, 30000, 40000, 40001, 10**6]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=range(len(SCHEDULES)))
def test_bounds_follow_schedule(schedule):
    layer = BatchRenormalization(**schedule)
    args = (
        layer.r_max,
        layer.d_max,
        layer.warmup_steps,
        layer.r_max_steps,
        layer.d_max_steps,
    )
    # Before build, the next training call is the first one.
    assert_close(
        [layer.current_r_max(), layer.current_d_max()],
        schedule_bounds(0, *args),
        rtol=1e-6,
        atol=1e-7,
    )
    layer.build((None, 2))
    for k in STEPS:
        expected = schedule_bounds(k, *args)
        assert_close(to_numpy(layer.bounds(k)), expected, 1e-6, 1e-7)
        assert_close(to_numpy(renorm_bounds(k, *args)), expected, 1e-6, 1e-7)
        # Plain numbers with a plain clip: what train.py's warnings use.
        plain = renorm_bounds(k, *args, clip=lambda v, lo, hi: min(max(v, lo),
                                                                   hi))
        assert_close(plain, expected, 1e-12, 0)
        tensor_bounds = renorm_bounds(ops.convert_to_tensor(k), *args)
        assert all(
            keras.backend.standardize_dtype(b.dtype) == "float32"
            for b in tensor_bounds
        )
        assert_close(to_numpy(tensor_bounds), expected, 1e-6, 1e-7)
        layer.step.assign(k)
        current = [layer.current_r_max(), layer.current_d_max()]
        assert all(isinstance(b, float) for b in current)
        assert_close(current, expected, 1e-6, 1e-7)


@pytest.mark.parametrize(
    "schedule",
    [
        FIXED_CLIP,
        dict(
            r_max=2.0, d_max=1.0, warmup_steps=3, r_max_steps=0, d_max_steps=0
        ),
        dict(
            r_max=2.0, d_max=1.0, warmup_steps=2, r_max_steps=4, d_max_steps=6
        ),
    ],
    ids=["fixed-from-0", "jump-at-warmup", "ramp"],
)
def test_training_calls_use_the_bounds_of_the_counter(schedule):
    """The k-th training call clips with the bounds of step k, then k += 1."""
    rng = np.random.default_rng(11)
    layer = BatchRenormalization(momentum=0.9, **schedule)
    ref = reference_for(layer, init_layer(layer, (8, 3), rng))
    warmup = schedule["warmup_steps"]
    for k in range(7):
        expected_bounds = schedule_bounds(k, *[
            schedule[n]
            for n in ("r_max", "d_max", "warmup_steps", "r_max_steps",
                      "d_max_steps")
        ])
        if k < warmup:
            assert expected_bounds == (1.0, 0.0)
        elif schedule["r_max_steps"] <= warmup:
            # Fixed clipping from step 0, or a jump to full at warm-up.
            assert expected_bounds[0] == schedule["r_max"]
        assert int(to_numpy(layer.step)) == k
        x = random_batch(rng, (8, 3), -1, [3.0, -2.0, 0.5], [4.0, 0.2, 1.0])
        y = to_numpy(layer(x, training=True))
        expected = ref.train(x)
        assert (expected["r_max"], expected["d_max"]) == expected_bounds
        assert_close(y, expected["y"], err_msg=f"step {k}")
        assert_close(layer.moving_stddev, ref.moving_stddev)
        # The clipping is active whenever the bounds allow it.
        assert np.any(expected["r"] != expected["r_unclipped"])


def test_counter_counts_training_calls_only():
    rng = np.random.default_rng(0)
    layer = BatchRenormalization()
    x = rng.normal(size=(4, 3)).astype("float32")
    layer(x)  # builds; inference by default
    assert int(to_numpy(layer.step)) == 0
    for k in range(1, 4):
        layer(x, training=True)
        assert int(to_numpy(layer.step)) == k
        layer(x, training=False)
        layer(x)
        assert int(to_numpy(layer.step)) == k
    layer.trainable = False
    layer(x, training=True)
    assert int(to_numpy(layer.step)) == 3


def small_model(brn_kwargs, inputs=4, outputs=1):
    return keras.Sequential(
        [
            keras.Input((inputs,)),
            keras.layers.Dense(8),
            BatchRenormalization(**brn_kwargs),
            keras.layers.ReLU(),
            keras.layers.Dense(outputs),
        ]
    )


@pytest.mark.parametrize(
    "shape, axis",
    [((6, 4), -1), ((3, 4, 2, 3), 1), ((3, 2, 2, 5), -1)],
    ids=["rank2", "rank4-axis1", "rank4-last"],
)
def test_inference_uses_moving_statistics(shape, axis):
    rng = np.random.default_rng(5)
    layer = BatchRenormalization(axis=axis, **FIXED_CLIP)
    ref = reference_for(layer, init_layer(layer, shape, rng))
    channels = shape[axis]
    x = random_batch(rng, shape, axis, [2.0] * channels, [3.0] * channels)
    before = snapshot(layer)
    expected = ref.infer(x)
    for y in (layer(x), layer(x, training=False)):
        assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # Each example's output is independent of the rest of the batch.
    other = random_batch(rng, shape, axis, [-5.0] * channels, [0.1] * channels)
    mixed = np.concatenate([x[:1], other[1:]])
    assert_close(layer(mixed)[:1], expected[:1], rtol=1e-5, atol=1e-5)
    assert_close(layer(x[:1]), expected[:1], rtol=1e-5, atol=1e-5)
    assert_unchanged(layer, before)
    # Sanity: a training call would have given something else.
    y_train = to_numpy(layer(x, training=True))
    assert not np.allclose(y_train, expected, atol=0.1)


@pytest.mark.parametrize(
    "mode", ["training-false", "default", "trainable-false", "fit-frozen"]
)
def test_frozen_or_inference_never_changes_variables(mode):
    rng = np.random.default_rng(2)
    keras.utils.set_random_seed(2)
    model = small_model(dict(momentum=0.5, **FIXED_CLIP))
    layer = model.layers[1]
    ref = reference_for(layer, init_layer(layer, (None, 8), rng))
    model.layers[0].trainable = False  # keeps the layer's inputs fixed
    x = rng.normal(2.0, 3.0, size=(16, 4)).astype("float32")
    hidden = to_numpy(model.layers[0](x))
    before = snapshot(layer)
    if mode == "fit-frozen":
        layer.trainable = False
        model.compile(keras.optimizers.SGD(0.5), "mse")
        model.fit(x, x[:, :1], batch_size=4, epochs=2, verbose=0)
        assert int(to_numpy(model.optimizer.iterations)) == 8
        y = to_numpy(layer(hidden, training=True))
    elif mode == "trainable-false":
        layer.trainable = False
        y = to_numpy(layer(hidden, training=True))
        assert not layer.trainable_variables
    elif mode == "training-false":
        y = to_numpy(layer(hidden, training=False))
    else:
        y = to_numpy(layer(hidden))
    assert_unchanged(layer, before)
    assert_close(y, ref.infer(hidden), rtol=1e-5, atol=1e-5)
    # Not vacuous: the same call in training mode changes the state.
    if mode != "fit-frozen":
        layer.trainable = True
        layer(hidden, training=True)
        assert int(to_numpy(layer.step)) == 1
        assert not np.allclose(to_numpy(layer.moving_mean), before[
            layer.moving_mean.path])


@pytest.mark.parametrize("via", ["argument", "masking-layer"])
def test_mask_gives_statistics_of_unmasked_subset(via):
    rng = np.random.default_rng(4)
    shape = (4, 6, 3)
    kwargs = dict(momentum=0.8, **FIXED_CLIP)
    masked = BatchRenormalization(**kwargs)
    subset = BatchRenormalization(**kwargs)
    values = init_layer(masked, shape, rng)
    subset.build((None, 3))
    for a, b in zip(masked.variables, subset.variables):
        b.assign(a)
    ref = reference_for(masked, values)
    model = keras.Sequential(
        [keras.Input(shape[1:]), keras.layers.Masking(0.0), masked]
    )
    for k in range(3):
        x = random_batch(rng, shape, -1, [3.0, -1.0, 0.5], [0.3, 2.0, 4.0])
        mask = rng.random(shape[:2]) < 0.6
        mask[:, 0] = True
        mask[0, :] = False
        if via == "argument":
            mask_t = ops.convert_to_tensor(mask)
            y = to_numpy(masked(x, training=True, mask=mask_t))
        else:
            x = x * mask[..., None]  # Masking masks the all-zero timesteps
            y = to_numpy(model(x, training=True))
        y_subset = to_numpy(subset(x[mask], training=True))
        expected = ref.train(x, mask=mask)
        assert_close(y[mask], y_subset, rtol=1e-5, atol=1e-5)
        assert_close(y, expected["y"])
        assert_close(masked.moving_mean, subset.moving_mean, 1e-6, 1e-6)
        assert_close(masked.moving_stddev, subset.moving_stddev, 1e-6, 1e-6)
        assert_close(masked.moving_mean, ref.moving_mean)
        assert_close(masked.moving_stddev, ref.moving_stddev)
        assert int(to_numpy(masked.step)) == k + 1
        # Not vacuous: the masked-out positions would change the statistics.
        full = ref.copy().train(x)
        assert np.max(np.abs(full["mean"] - expected["mean"])) > 0.05


INVALID_ARGUMENTS = [
    ("r_max", 0.5, {}),
    ("r_max", 0.0, {}),
    ("r_max", -2.0, {}),
    ("r_max", "3", {}),
    ("d_max", -1.0, {}),
    ("d_max", -1e-3, {}),
    ("momentum", 1.0, {}),
    ("momentum", 1.5, {}),
    ("momentum", -0.1, {}),
    ("epsilon", 0.0, {}),
    ("epsilon", -1e-3, {}),
    ("warmup_steps", -1, {}),
    ("r_max_steps", -5, {}),
    ("d_max_steps", -2, {}),
    ("warmup_steps", 2.5, {}),
    ("r_max_steps", 5, dict(warmup_steps=10)),
    ("d_max_steps", 3, dict(warmup_steps=10)),
    ("r_max_steps", 9, dict(warmup_steps=10, d_max_steps=0)),
    ("axis", 1.5, {}),
]


@pytest.mark.parametrize(
    "name, value, other", INVALID_ARGUMENTS,
    ids=[f"{n}={v!r}" for n, v, _ in INVALID_ARGUMENTS],
)
def test_invalid_arguments_raise(name, value, other):
    with pytest.raises(ValueError) as info:
        BatchRenormalization(**{name: value}, **other)
    message = str(info.value)
    assert name in message
    assert f"{name}={value!r}" in message or f"{name}={value}" in message


@pytest.mark.parametrize("name, value", [
    ("r_max", 1.0), ("d_max", 0.0), ("momentum", 0.0), ("epsilon", 1e-9),
    ("warmup_steps", 0), ("r_max_steps", 0), ("d_max_steps", 0),
])
def test_boundary_arguments_are_accepted(name, value):
    layer = BatchRenormalization(**{name: value})
    assert getattr(layer, name) == value


@pytest.mark.parametrize("axis, shape", [(2, (None, 4)), (-3, (None, 4)),
                                         (4, (None, 2, 2, 3))])
def test_axis_out_of_range_raises(axis, shape):
    layer = BatchRenormalization(axis=axis)
    with pytest.raises(ValueError) as info:
        layer.build(shape)
    assert f"axis={axis}" in str(info.value)
    with pytest.raises(ValueError, match="axis"):
        BatchRenormalization(axis=axis)(np.zeros((2,) + shape[1:], "float32"))


def test_unknown_channel_dimension_raises():
    with pytest.raises(ValueError, match="channel"):
        BatchRenormalization().build((None, None))
    with pytest.raises(ValueError, match="channel"):
        BatchRenormalization()(keras.Input(shape=(None,)))
    with pytest.raises(ValueError, match="channel"):
        BatchRenormalization(axis=1)(keras.Input(shape=(None, 3)))
    # A known channel dimension with unknown other dimensions is fine.
    outputs = BatchRenormalization(axis=1)(keras.Input(shape=(3, None)))
    assert tuple(outputs.shape) == (None, 3, None)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("where", ["global", "layer"])
def test_mixed_precision(policy, where, restore_dtype_policy):
    rng = np.random.default_rng(8)
    if where == "global":
        keras.config.set_dtype_policy(policy)
        layer = BatchRenormalization(momentum=0.9, **FIXED_CLIP)
    else:
        layer = BatchRenormalization(momentum=0.9, dtype=policy, **FIXED_CLIP)
    compute = "float16" if policy == "mixed_float16" else "bfloat16"
    assert layer.compute_dtype == compute
    ref = reference_for(layer, init_layer(layer, (16, 4), rng))
    assert "int" in layer.step.dtype
    for v in layer.variables:
        assert v.dtype == ("float32" if v.name != "step" else layer.step.dtype)
    for _ in range(3):
        x = random_batch(rng, (16, 4), -1, [30.0, -1.0, 0.5, 100.0],
                         [0.2, 3.0, 40.0, 1.0])
        # Keras casts the inputs to the compute dtype before the call.
        x_in = to_numpy(ops.cast(ops.cast(x, compute), "float32"))
        y = layer(x, training=True)
        assert keras.backend.standardize_dtype(y.dtype) == compute
        y = to_numpy(ops.cast(y, "float32"))
        assert np.all(np.isfinite(y))
        expected = ref.train(x_in)
        assert_close(y, expected["y"], rtol=1e-2, atol=1e-2)
        # Statistics in float32: the moving ones match to float32 precision.
        assert_close(layer.moving_mean, ref.moving_mean, 1e-5, 1e-5)
        assert_close(layer.moving_stddev, ref.moving_stddev, 1e-5, 1e-5)
    for v in layer.variables:
        assert v.dtype == ("float32" if v.name != "step" else layer.step.dtype)
    y = layer(x)
    assert keras.backend.standardize_dtype(y.dtype) == compute
    assert_close(to_numpy(ops.cast(y, "float32")), ref.infer(x_in), 1e-2, 1e-2)


def test_mixed_precision_model_trains(restore_dtype_policy):
    keras.config.set_dtype_policy("mixed_bfloat16")
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    model = small_model(dict(warmup_steps=1, r_max_steps=3, d_max_steps=2))
    model.compile(keras.optimizers.SGD(0.05), "mse")
    x = rng.normal(1.0, 2.0, size=(32, 4)).astype("float32")
    y = x[:, :1] - x[:, 1:2]
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    layer = model.layers[1]
    assert int(to_numpy(layer.step)) == 8
    for v in layer.variables:
        assert np.all(np.isfinite(to_numpy(v)))
        assert v.dtype == ("float32" if v.name != "step" else layer.step.dtype)
    out = model(x)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"


def learnable_data(kind, rng):
    if kind == "dense":
        x = rng.normal(3.0, 2.0, size=(256, 6)).astype("float32")
        w = rng.normal(size=(6, 3))
        labels = np.argmax((x - 3.0) @ w, axis=1)
    else:
        x = rng.normal(1.0, 1.0, size=(192, 6, 6, 2)).astype("float32")
        labels = (x[..., 0].mean(axis=(1, 2)) > x[..., 1].mean(axis=(1, 2)))
        labels = labels.astype("int64")
    return x, labels


def learning_model(kind, brn_kwargs):
    if kind == "dense":
        layers = [
            keras.Input((6,)),
            keras.layers.Dense(16),
            BatchRenormalization(**brn_kwargs),
            keras.layers.ReLU(),
            keras.layers.Dense(3),
        ]
    else:
        layers = [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(6, 3, padding="same"),
            BatchRenormalization(**brn_kwargs),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    return keras.Sequential(layers)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_model_learns(kind):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, labels = learnable_data(kind, rng)
    model = learning_model(
        kind, dict(warmup_steps=4, r_max_steps=20, d_max_steps=12)
    )
    model.compile(
        keras.optimizers.Adam(0.02),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    layer = model.layers[1]
    initial = model.evaluate(x, labels, batch_size=64, verbose=0)
    assert int(to_numpy(layer.step)) == 0
    history = model.fit(x, labels, batch_size=32, epochs=6, verbose=0)
    # One step of the counter per training step of `fit`.
    steps = 6 * int(np.ceil(len(x) / 32))
    assert int(to_numpy(layer.step)) == steps
    assert int(to_numpy(model.optimizer.iterations)) == steps
    ref = reference_for(layer, {})
    assert_close(
        [layer.current_r_max(), layer.current_d_max()], ref.bounds(), 1e-6, 1e-6
    )
    before = snapshot(layer)
    final = model.evaluate(x, labels, batch_size=64, verbose=0)
    model.predict(x[:8], verbose=0)
    assert_unchanged(layer, before)
    losses = history.history["loss"]
    assert losses[-1] < 0.6 * losses[0]
    assert final < 0.6 * initial


@pytest.mark.parametrize("jit_compile", [True, False], ids=["jit", "no-jit"])
@pytest.mark.parametrize("shape, axis", [((3, 2, 2), 1), ((2, 2, 3), -1)],
                         ids=["channels-first", "channels-last"])
def test_compiled_training_matches_eager_and_reference(shape, axis,
                                                       jit_compile):
    """`train_on_batch` compiled (XLA on TF and JAX where `jit_compile`) vs
    eager vs reference; channels-last rank-4 inputs take the fused kernel
    where the backend has one.

    The model is the layer alone, trained with SGD on `mean(y ** 2)`, so the
    float64 reference gives every number of each step.
    """
    if BACKEND == "jax" and not jit_compile:
        pytest.skip("JAX's trainer always compiles")
    rng = np.random.default_rng(6)
    lr = 0.1
    # A schedule that moves during the compiled steps, and clips.
    kwargs = dict(r_max=1.5, d_max=0.3, momentum=0.8, warmup_steps=1,
                  r_max_steps=3, d_max_steps=2)
    eager = keras.Sequential(
        [keras.Input(shape), BatchRenormalization(axis=axis, **kwargs)]
    )
    compiled = keras.Sequential(
        [keras.Input(shape), BatchRenormalization(axis=axis, **kwargs)]
    )
    ref = reference_for(
        eager.layers[0], init_layer(eager.layers[0], (None,) + shape, rng)
    )
    compiled.set_weights(eager.get_weights())
    eager.compile(keras.optimizers.SGD(lr), "mse", run_eagerly=True)
    compiled.compile(
        keras.optimizers.SGD(lr), "mse",
        jit_compile=jit_compile and BACKEND != "torch"
    )
    for model in (eager, compiled):
        assert model.layers[0].uses_fast_path == fast_path_expected(
            model.layers[0], (None,) + shape, axis)
    zeros = np.zeros((8,) + shape, "float32")
    clipped = []
    for k in range(4):
        x = random_batch(
            rng, (8,) + shape, axis, [3.0, -1.0, 0.2], [0.3, 1.0, 4.0]
        )
        loss_eager = eager.train_on_batch(x, zeros)
        loss_compiled = compiled.train_on_batch(x, zeros)
        y = ref.copy().train(x)["y"]
        expected = ref.train(x, g_y=2 * y / y.size)
        ref.gamma = ref.gamma - lr * expected["dgamma"]
        ref.beta = ref.beta - lr * expected["dbeta"]
        clipped.append(np.any(expected["r"] != expected["r_unclipped"]))
        assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-5)
        assert_close(loss_compiled, np.mean(y**2), err_msg=f"step {k}")
        for model in (eager, compiled):
            layer = model.layers[0]
            assert int(to_numpy(layer.step)) == k + 1
            assert_close(layer.gamma, ref.gamma, err_msg=f"step {k}")
            assert_close(layer.beta, ref.beta, err_msg=f"step {k}")
            assert_close(layer.moving_mean, ref.moving_mean)
            assert_close(layer.moving_stddev, ref.moving_stddev)
    assert sum(clipped) >= 3  # the clipping is active after the warm-up
    for a, b in zip(eager.weights, compiled.weights):
        assert_close(to_numpy(b), to_numpy(a), 1e-5, 1e-5, err_msg=a.name)
    assert compiled.layers[0].current_r_max() == eager.layers[0].current_r_max()
    assert_close(compiled.predict(x, verbose=0), ref.infer(x), 1e-5, 1e-5)


# ------------------------------------------------------------ the fast path
def test_fused_argument_is_validated():
    with pytest.raises(ValueError, match="fused='yes'"):
        BatchRenormalization(fused="yes")
    with pytest.raises(ValueError, match="fused=1"):
        BatchRenormalization(fused=1)
    assert BatchRenormalization(fused=False).get_config()["fused"] is False
    if not has_fast_path():
        with pytest.raises(ValueError, match=f"backend is {BACKEND}"):
            BatchRenormalization(fused=True)
        return
    BatchRenormalization(fused=True).build((None, 4, 4, 3))
    unfit = [((None, 4), {}, "rank 4 with axis=-1"),
             ((None, 3, 4, 4), dict(axis=1), "axis=1")]
    if BACKEND == "tensorflow":  # its kernel's smallest epsilon is 1.001e-5
        unfit.append(((None, 4, 4, 3), dict(epsilon=1e-6), "epsilon=1e-06"))
    else:
        layer = BatchRenormalization(fused=True, epsilon=1e-6)
        layer.build((None, 4, 4, 3))
        assert layer.uses_fast_path
    for shape, kwargs, words in unfit:
        with pytest.raises(ValueError, match=words):
            BatchRenormalization(fused=True, **kwargs).build(shape)
        # fused=None falls back to the portable path instead.
        layer = BatchRenormalization(**kwargs)
        layer.build(shape)
        assert not layer.uses_fast_path


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's XLA")
def test_tensorflow_takes_the_portable_path_under_xla():
    """Under `jit_compile=True` XLA lowers the fused kernels into its own
    ops, where the portable path measured faster: no FusedBatchNorm op is
    traced there, and one forward and one backward are traced without XLA."""
    import tensorflow as tf

    layer = BatchRenormalization(**FIXED_CLIP)
    layer.build((4, 3, 3, 2))

    def op_types(jit_compile):
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(tf.square(layer(x, training=True)))
            return tape.gradient(loss, x)

        function = tf.function(step, jit_compile=jit_compile)
        graph = function.get_concrete_function(
            tf.TensorSpec((4, 3, 3, 2))).graph
        return [op.type for op in graph.get_operations()]

    assert layer.uses_fast_path
    assert op_types(False).count("FusedBatchNormV3") == 1
    assert op_types(False).count("FusedBatchNormGradV3") == 1
    assert not any("FusedBatchNorm" in t for t in op_types(True))


@pytest.mark.skipif(not has_fast_path(), reason="no fused kernel here")
@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 1, 1, 3), (4, 5, 3, 2)])
def test_fast_path_matches_portable_path(shape):
    """Same outputs, gradients and state on both paths, also for a batch of
    a single value per channel (variance 0) and masked calls (portable)."""
    rng = np.random.default_rng(11)
    fused = BatchRenormalization(momentum=0.7, **FIXED_CLIP)
    portable = BatchRenormalization(momentum=0.7, fused=False, **FIXED_CLIP)
    ref = reference_for(fused, init_layer(fused, shape, rng))
    init_layer(portable, shape, rng)
    portable.set_weights(fused.get_weights())
    assert fused.uses_fast_path and not portable.uses_fast_path
    for k in range(3):
        x = random_batch(rng, shape, -1, [2.0, -1.0, 0.5][: shape[-1]],
                         [0.5, 2.0, 1.0][: shape[-1]])
        w = rng.normal(size=shape).astype("float32")
        results = [train_call_with_grads(layer, x, w)
                   for layer in (fused, portable)]
        expected = ref.train(x, g_y=w)
        for y, dx, dvars in results:
            assert np.all(np.isfinite(y))
            assert_close(y, expected["y"], err_msg=f"step {k}")
            assert_close(dx, expected["dx"], err_msg=f"step {k}")
            assert_close(dvars["gamma"], expected["dgamma"])
            assert_close(dvars["beta"], expected["dbeta"])
        for a, b in zip(fused.weights, portable.weights):
            assert_close(to_numpy(a), to_numpy(b), 1e-5, 1e-5, err_msg=a.name)
        assert_close(fused.moving_stddev, ref.moving_stddev)
    # A mask leaves the fused kernel for the portable path: same result.
    mask = np.ones(shape[:-1], bool)
    mask.flat[0] = shape[0] * shape[1] * shape[2] == 1
    outputs = [to_numpy(layer(x, training=True, mask=mask))
               for layer in (fused, portable)]
    assert_close(outputs[0], outputs[1], 1e-5, 1e-5)


# ------------------------------- the statistics' formulation, by device
def test_formulation_follows_the_device(tmp_path):
    """Two reads on any device but a CPU, whatever the host's CPU; on a CPU,
    two reads with AVX-512 and one without (the host's cpuinfo)."""
    from batch_renorm import _one_read_moments, cpu_has_avx512

    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    avx512 = tmp_path / "avx512"
    avx512.write_text("flags\t\t: fpu avx2 avx512f avx512bw\n")
    missing = str(tmp_path / "none")
    assert _one_read_moments("cpu", str(avx2))
    assert not _one_read_moments("cpu", str(avx512))
    assert _one_read_moments("cpu", missing)  # not Linux: as without AVX-512
    assert cpu_has_avx512(str(avx512)) is True
    assert cpu_has_avx512(str(avx2)) is False
    assert cpu_has_avx512(missing) is None
    for device in ("gpu", "tpu", "mps"):
        for cpuinfo in (str(avx2), str(avx512), missing):
            assert not _one_read_moments(device, cpuinfo)


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("avx512", [False, True], ids=["avx2", "avx512"])
def test_training_calls_take_the_formulation_of_their_device(
        monkeypatch, tmp_path, device, avx512):
    """`statistics_formulation` names what a training call on the portable
    path computes: the one-read statistics hold an `ops.cond` (their
    recomputation where they cancel), the two-read ones none."""
    import batch_renorm

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx2" + (" avx512f" if avx512 else ""))
    decide = batch_renorm._one_read_moments
    monkeypatch.setattr(batch_renorm, "_one_read_moments",
                        lambda device_type: decide(device_type, str(cpuinfo)))
    monkeypatch.setattr(batch_renorm, "_device_type", lambda x=None: device)
    conds = []
    cond = ops.cond
    monkeypatch.setattr(ops, "cond", lambda *a, **k: conds.append(1)
                        or cond(*a, **k))
    layer = BatchRenormalization(fused=False, **FIXED_CLIP)
    expected = "one-read" if device == "cpu" and not avx512 else "two-read"
    assert layer.statistics_formulation == expected
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    ref = reference_for(layer, init_layer(layer, x.shape,
                                          np.random.default_rng(1)))
    assert layer.statistics_formulation == expected
    y = layer(x, training=True)
    assert len(conds) == (expected == "one-read")
    assert_close(y, ref.train(x)["y"])
