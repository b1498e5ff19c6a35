"""`virtual_batch_size`: Algorithm 1 per group of consecutive examples.

Expected numbers come from the float64 reference applied to each group
(`RenormReference.train_groups`) and, for ghost batch normalization
(r_max = 1, d_max = 0), from tf.keras's `BatchNormalization(
virtual_batch_size=V)`, on every backend.
"""

import numpy as np
import pytest

import keras

from batch_renorm import BatchRenormalization
from batch_renorm import convert_to_renorm
from batch_renorm import has_fast_path
from test_batch_renorm import BACKEND
from test_batch_renorm import FIXED_CLIP
from test_batch_renorm import assert_close
from test_batch_renorm import init_layer
from test_batch_renorm import random_batch
from test_batch_renorm import reference_for
from test_batch_renorm import to_numpy
from test_batch_renorm import train_call_with_grads

# Exact batch normalization: no correction, no schedule.
GHOST = dict(r_max=1.0, d_max=0.0, warmup_steps=0, r_max_steps=0,
             d_max_steps=0)

# id, input shape, axis, virtual batch size (some do not divide the batch).
CASES = [
    ("rank2-divides", (12, 5), -1, 4),
    ("rank2-last-group-smaller", (10, 5), -1, 4),
    ("rank3", (9, 4, 3), -1, 3),
    ("rank4-channels-last", (8, 4, 4, 3), -1, 2),
    ("rank4-channels-last-uneven", (7, 3, 3, 4), 3, 3),
    ("rank4-channels-first", (12, 3, 4, 4), 1, 4),
    ("rank5", (6, 2, 3, 3, 2), -1, 4),
    ("groups-of-one", (5, 6, 6, 2), -1, 1),
]


def grouped_layer(shape, axis, size, rng, fused=None, **kwargs):
    layer = BatchRenormalization(axis=axis, momentum=0.8, fused=fused,
                                 virtual_batch_size=size,
                                 **{**FIXED_CLIP, **kwargs})
    values = init_layer(layer, shape, rng)
    return layer, reference_for(layer, values)


def channel_batch(rng, shape, axis):
    channels = shape[axis]
    return random_batch(rng, shape, axis, rng.normal(0, 1.5, channels),
                        rng.uniform(0.3, 2.5, channels))


@pytest.mark.parametrize("shape, axis, size",
                         [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
@pytest.mark.parametrize("fused", [None, False], ids=["default", "portable"])
def test_each_group_is_algorithm_1_against_the_reference(shape, axis, size,
                                                         fused):
    """Two training steps: outputs, gradients of x, gamma and beta, the
    moving statistics and the counter, as the reference on each group."""
    rng = np.random.default_rng(sum(shape) + size)
    layer, reference = grouped_layer(shape, axis, size, rng, fused)
    for step in range(2):
        x = channel_batch(rng, shape, axis)
        w = rng.normal(size=shape).astype("float32")
        y, dx, grads = train_call_with_grads(layer, x, w)
        expected = reference.train_groups(x, size, g_y=w)
        # Clipping is active: the test is not plain per-group BN.
        assert np.any(expected["r"] != expected["stddev"] /
                      reference.moving_stddev) or step
        assert_close(y, expected["y"], err_msg=f"y, step {step}")
        assert_close(dx, expected["dx"], err_msg=f"dx, step {step}")
        assert_close(grads["gamma"], expected["dgamma"], err_msg="dgamma")
        assert_close(grads["beta"], expected["dbeta"], err_msg="dbeta")
        assert_close(layer.moving_mean, reference.moving_mean, rtol=1e-5,
                     atol=1e-6, err_msg=f"moving_mean, step {step}")
        assert_close(layer.moving_stddev, reference.moving_stddev, rtol=1e-5,
                     atol=1e-6, err_msg=f"moving_stddev, step {step}")
    assert int(to_numpy(layer.step)) == reference.step == 2


def test_groups_differ_from_the_whole_batch():
    """The test above could pass with groups ignored only if groups and
    batch had the same statistics: here they do not, and the outputs
    differ."""
    rng = np.random.default_rng(3)
    x = channel_batch(rng, (8, 4, 4, 3), -1)
    x[4:] += 3.0
    grouped = BatchRenormalization(virtual_batch_size=4, **FIXED_CLIP)
    whole = BatchRenormalization(**FIXED_CLIP)
    difference = np.abs(to_numpy(grouped(x, training=True))
                        - to_numpy(whole(x, training=True)))
    assert difference.max() > 0.5


@pytest.mark.parametrize("size", [8, 20])
def test_a_group_as_large_as_the_batch_is_the_whole_batch(size):
    rng = np.random.default_rng(size)
    x = channel_batch(rng, (8, 3, 3, 4), -1)
    grouped = BatchRenormalization(virtual_batch_size=size, **FIXED_CLIP)
    whole = BatchRenormalization(**FIXED_CLIP)
    assert_close(grouped(x, training=True), whole(x, training=True),
                 rtol=1e-6, atol=1e-6)
    assert_close(grouped.moving_stddev, whole.moving_stddev, rtol=1e-6,
                 atol=1e-7)


def test_mask_leaves_positions_out_of_their_group():
    """Masked positions (holding NaN and huge values) are left out of their
    group's statistics; a wholly masked group is left out of the moving
    averages."""
    rng = np.random.default_rng(5)
    shape, size = (10, 6, 3), 4
    layer, reference = grouped_layer(shape, -1, size, rng)
    x = channel_batch(rng, shape, -1)
    mask = rng.uniform(size=shape[:-1]) < 0.7
    mask[:, 0] = True  # every group holds data ...
    hostile = x.copy()
    hostile[~mask] = np.where(rng.uniform(size=(~mask).sum()) < 0.5, np.nan,
                              3e38)[:, None]
    y = to_numpy(layer(hostile, training=True, mask=mask))
    # The reference sees the clean values (it would multiply NaN by 0).
    expected = reference.train_groups(x, size, mask=mask)
    assert_close(y[mask], expected["y"][mask])
    assert_close(layer.moving_mean, reference.moving_mean, atol=1e-6)
    assert_close(layer.moving_stddev, reference.moving_stddev, atol=1e-6)
    mask[4:8] = False  # ... but now the second group holds none
    x = channel_batch(rng, shape, -1)
    layer(x, training=True, mask=mask)
    reference.train_groups(x, size, mask=mask)
    assert_close(layer.moving_mean, reference.moving_mean, atol=1e-6)
    assert_close(layer.moving_stddev, reference.moving_stddev, atol=1e-6)


def test_inference_is_unchanged_by_groups():
    rng = np.random.default_rng(7)
    shape = (8, 3, 3, 2)
    layer, reference = grouped_layer(shape, -1, 2, rng)
    x = channel_batch(rng, shape, -1)
    assert_close(layer(x), reference.infer(x), rtol=1e-6, atol=1e-6)
    assert_close(layer(x, training=False), reference.infer(x), rtol=1e-6,
                 atol=1e-6)


def tf_keras_ghost_batch_norm(x, w, size, axis, momentum, epsilon, gamma,
                              beta, moving_mean, moving_variance):
    """tf.keras's BatchNormalization(virtual_batch_size=size) on `x`, one
    training call: outputs, gradients of x, gamma, beta, the moving mean.

    tf.keras forms its groups by reshaping the batch to (size, N / size,
    ...) and normalizing over axis 0: group g holds examples g, g + G, g +
    2G, ... (G = N / size). The inputs are reordered so that its groups are
    our groups of consecutive examples, and the outputs ordered back."""
    import tensorflow as tf
    import tf_keras

    groups = len(x) // size

    def strided(a):  # consecutive groups -> tf.keras's strided groups
        return a.reshape((groups, size) + a.shape[1:]).swapaxes(0, 1).reshape(
            a.shape)

    def consecutive(a):
        return a.reshape((size, groups) + a.shape[1:]).swapaxes(0, 1).reshape(
            a.shape)

    layer = tf_keras.layers.BatchNormalization(
        axis=axis, momentum=momentum, epsilon=epsilon, fused=False,
        virtual_batch_size=size)
    layer.build(x.shape)
    # With virtual batches tf.keras keeps its weights in broadcast shapes.
    layer.set_weights([np.reshape(value, weight.shape) for value, weight in
                       zip([gamma, beta, moving_mean, moving_variance],
                           layer.weights)])
    x_t = tf.constant(strided(x))
    with tf.GradientTape() as tape:
        tape.watch(x_t)
        y = layer(x_t, training=True)
        loss = tf.reduce_sum(y * strided(w))
    dx, dgamma, dbeta = tape.gradient(loss, [x_t, layer.gamma, layer.beta])
    return {"y": consecutive(y.numpy()), "dx": consecutive(dx.numpy()),
            "dgamma": dgamma.numpy().ravel(), "dbeta": dbeta.numpy().ravel(),
            "moving_mean": layer.moving_mean.numpy().ravel()}


@pytest.mark.parametrize("shape, axis, size", [
    ((16, 6), -1, 4),
    ((8, 4, 4, 3), -1, 2),
    ((12, 3, 4, 4), 1, 4),
], ids=["rank2", "rank4-channels-last", "rank4-channels-first"])
@pytest.mark.parametrize("fused", [None, False], ids=["default", "portable"])
def test_ghost_batch_normalization_is_tf_keras(shape, axis, size, fused):
    """With r_max = 1, d_max = 0 the layer is ghost batch normalization:
    tf.keras's outputs, gradients and moving mean. (tf.keras moves its
    moving variance towards the mean of the group variances, this layer its
    moving stddev towards the mean of the group stddevs.)"""
    pytest.importorskip("tf_keras")
    rng = np.random.default_rng(11)
    layer = BatchRenormalization(axis=axis, momentum=0.7, epsilon=1e-3,
                                 virtual_batch_size=size, fused=fused, **GHOST)
    values = init_layer(layer, shape, rng)
    x = channel_batch(rng, shape, axis)
    w = rng.normal(size=shape).astype("float32")
    expected = tf_keras_ghost_batch_norm(
        x, w, size, axis, 0.7, 1e-3,
        *[values[k].astype("float32") for k in ("gamma", "beta",
                                                 "moving_mean")],
        (values["moving_stddev"] ** 2 - 1e-3).astype("float32"))
    y, dx, grads = train_call_with_grads(layer, x, w)
    assert_close(y, expected["y"], rtol=1e-4, atol=1e-5)
    assert_close(dx, expected["dx"], rtol=1e-4, atol=1e-5)
    assert_close(grads["gamma"], expected["dgamma"], rtol=1e-4, atol=1e-5)
    assert_close(grads["beta"], expected["dbeta"], rtol=1e-4, atol=1e-5)
    assert_close(layer.moving_mean, expected["moving_mean"], rtol=1e-5,
                 atol=1e-6)


def test_fit_with_a_smaller_last_batch_keeps_algorithm_1():
    """model.fit over 10 examples in batches of 4 (the last one of 2),
    compiled on each backend (a TensorFlow graph sees a batch of unknown
    size): the moving statistics of the reference on each batch's groups."""
    rng = np.random.default_rng(13)
    shape = (10, 3, 3, 2)
    layer = BatchRenormalization(momentum=0.6, virtual_batch_size=3,
                                 **FIXED_CLIP)
    model = keras.Sequential([keras.Input(shape[1:]), layer])
    values = init_layer(layer, (None,) + shape[1:], rng)
    reference = reference_for(layer, values)
    # A zero learning rate: gamma and beta stay, the state moves.
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = channel_batch(rng, shape, -1)
    model.fit(x, np.zeros(shape, "float32"), batch_size=4, shuffle=False,
              epochs=1, verbose=0)
    for start in (0, 4, 8):
        reference.train_groups(x[start:start + 4], 3)
    assert int(to_numpy(layer.step)) == 3
    assert_close(layer.moving_mean, reference.moving_mean, atol=1e-6)
    assert_close(layer.moving_stddev, reference.moving_stddev, atol=1e-6)


def test_config_saving_and_conversion_keep_the_group_size(tmp_path):
    layer = BatchRenormalization(virtual_batch_size=4)
    config = layer.get_config()
    assert config["virtual_batch_size"] == 4
    assert config["synchronized"] is False
    assert BatchRenormalization.from_config(config).virtual_batch_size == 4
    model = keras.Sequential([keras.Input((4, 4, 3)),
                              keras.layers.Conv2D(3, 3),
                              keras.layers.BatchNormalization()])
    converted = convert_to_renorm(model, virtual_batch_size=2)
    renorm = converted.layers[-1]
    assert isinstance(renorm, BatchRenormalization)
    assert renorm.virtual_batch_size == 2
    path = tmp_path / "model.keras"
    converted.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[-1].virtual_batch_size == 2
    x = np.random.default_rng(0).normal(size=(6, 4, 4, 3)).astype("float32")
    assert_close(loaded(x, training=True), converted(x, training=True),
                 rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("value", [0, -2, 2.5, True, "4", 4.0])
def test_invalid_group_sizes_raise(value):
    with pytest.raises(ValueError, match=r"virtual_batch_size=" +
                       repr(value).replace(".", r"\.")):
        BatchRenormalization(virtual_batch_size=value)


def test_groups_along_the_channel_axis_raise():
    layer = BatchRenormalization(axis=0, virtual_batch_size=2)
    with pytest.raises(ValueError, match="axis=0, virtual_batch_size=2"):
        layer.build((4, 3))


@pytest.mark.parametrize("value", [1, None, "yes"])
def test_invalid_synchronized_raises(value):
    with pytest.raises(ValueError, match=f"synchronized={value!r}"):
        BatchRenormalization(synchronized=value)


def test_synchronized_needs_tensorflow_and_whole_batches():
    if BACKEND != "tensorflow":
        with pytest.raises(ValueError, match="only supported with the "
                           "TensorFlow backend"):
            BatchRenormalization(synchronized=True)
        return
    assert BatchRenormalization(synchronized=True).synchronized
    with pytest.raises(ValueError, match="exclude each other"):
        BatchRenormalization(synchronized=True, virtual_batch_size=4)
    # Without a strategy, synchronized is the ordinary layer.
    rng = np.random.default_rng(17)
    x = channel_batch(rng, (8, 3, 3, 2), -1)
    synced = BatchRenormalization(synchronized=True, **FIXED_CLIP)
    plain = BatchRenormalization(**FIXED_CLIP)
    assert_close(synced(x, training=True), plain(x, training=True),
                 rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not has_fast_path(), reason="no fused kernel on " + BACKEND)
@pytest.mark.parametrize("batch, groups", [(8, 4), (7, None)],
                         ids=["whole-groups", "last-group-smaller"])
def test_whole_groups_take_the_fused_kernel(monkeypatch, batch, groups):
    """On TensorFlow and PyTorch a rank-4 channels-last batch of whole groups
    takes the fused kernel per group and channel (the reference test above
    checks its numbers, as `default`); a smaller last group takes the
    portable path."""
    import batch_renorm

    calls = []
    fused = batch_renorm._fused_training_call

    def recording(layer, x, gamma, beta, dtype, groups=1):
        calls.append(groups)
        return fused(layer, x, gamma, beta, dtype, groups)

    monkeypatch.setattr(batch_renorm, "_fused_training_call", recording)
    layer = BatchRenormalization(virtual_batch_size=2, **FIXED_CLIP)
    x = channel_batch(np.random.default_rng(1), (batch, 4, 4, 3), -1)
    layer(x, training=True)
    assert calls == ([groups] if groups else [])
