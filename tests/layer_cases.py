"""The layer under test, shared by the layer's test files: its training
paths on this backend, a layer initialized with moving statistics, a batch,
the float64 reference's outputs for them, and comparisons."""

import numpy as np
import pytest

import keras
from keras import ops

from batch_renorm import has_fast_path
from reference import RenormReference

BACKEND = keras.backend.backend()
# The layer's paths for training calls: `None` takes the backend's fused
# kernel where it applies (TensorFlow), `False` the portable keras.ops path.
# Where no backend kernel exists both are the portable path: tested once.
PATHS = [None] + ([False] if has_fast_path() else [])
PATH_IDS = ["default"] + (["portable"] if has_fast_path() else [])


def fast_path_expected(layer, shape, axis):
    """Whether a training call of `layer` on `shape` should be fused."""
    return (has_fast_path() and layer.fused is not False and len(shape) == 4
            and axis % 4 == 3
            and (BACKEND != "tensorflow" or layer.epsilon >= 1.001e-5))

FIXED_CLIP = dict(
    r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=0, d_max_steps=0
)
NO_CLIP = dict(
    r_max=1e3, d_max=1e3, warmup_steps=0, r_max_steps=0, d_max_steps=0
)


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def assert_close(actual, expected, rtol=1e-4, atol=1e-4, err_msg=""):
    """`assert_allclose` with `atol` relative to the largest expected value."""
    expected = np.asarray(to_numpy(expected), np.float64)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(
        np.asarray(to_numpy(actual), np.float64),
        expected,
        rtol=rtol,
        atol=atol * scale,
        err_msg=err_msg,
    )


def snapshot(layer):
    return {v.path: to_numpy(v).copy() for v in layer.variables}


def assert_unchanged(layer, before):
    after = snapshot(layer)
    assert after.keys() == before.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)


def train_call_with_grads(layer, x, w, mask=None):
    """One training call `y = layer(x, training=True)`, with gradients.

    Returns `(y, dL/dx, {variable name: dL/dvariable})` as NumPy arrays for
    the loss `L = sum(y * w)`, with the gradients taken with respect to the
    layer's trainable variables. The layer's state is updated as by a normal
    training call. The only backend-specific code of the tests.
    """
    trainable = list(layer.trainable_variables)
    names = [v.name for v in trainable]
    if mask is not None:
        mask = ops.convert_to_tensor(mask)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x_t = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x_t)
            y = layer(x_t, training=True, mask=mask)
            loss = tf.reduce_sum(tf.cast(y, "float32") * w)
        grads = tape.gradient(loss, [x_t] + trainable)
    elif BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss_fn(x_, trainable_values):
            y, new_non_trainable = layer.stateless_call(
                trainable_values, non_trainable, x_, training=True, mask=mask
            )
            loss = jnp.sum(y.astype("float32") * w)
            return loss, (y, new_non_trainable)

        (_, (y, new_non_trainable)), (dx, dvars) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(jnp.asarray(x), [v.value for v in trainable])
        for variable, value in zip(
            layer.non_trainable_variables, new_non_trainable
        ):
            variable.assign(value)
        grads = [dx] + list(dvars)
    elif BACKEND == "torch":
        import torch

        x_t = ops.convert_to_tensor(x).detach().requires_grad_(True)
        y = layer(x_t, training=True, mask=mask)
        loss = torch.sum(y.float() * ops.convert_to_tensor(w))
        grads = torch.autograd.grad(loss, [x_t] + [v.value for v in trainable])
    else:
        pytest.skip(f"no gradient helper for backend {BACKEND}")
    grads = [to_numpy(g) for g in grads]
    return to_numpy(y), grads[0], dict(zip(names, grads[1:]))


def init_layer(layer, shape, rng, moving=True):
    """Builds `layer` and gives every float variable a random, nontrivial value.

    Returns the values as a dict of keyword arguments of `RenormReference`.
    """
    if not layer.built:
        layer.build(shape)
    channels = shape[layer.axis]
    values = {}
    if layer.scale:
        values["gamma"] = rng.uniform(0.5, 2.0, channels) * rng.choice(
            [-1.0, 1.0], channels
        )
        layer.gamma.assign(values["gamma"].astype("float32"))
    if layer.center:
        values["beta"] = rng.normal(0.0, 1.0, channels)
        layer.beta.assign(values["beta"].astype("float32"))
    if moving:
        values["moving_mean"] = rng.normal(0.0, 0.5, channels)
        values["moving_stddev"] = rng.uniform(0.7, 1.5, channels)
        layer.moving_mean.assign(values["moving_mean"].astype("float32"))
        layer.moving_stddev.assign(values["moving_stddev"].astype("float32"))
    # The reference must start from exactly the float32 values.
    return {k: v.astype("float32").astype("float64") for k, v in values.items()}


def reference_for(layer, values):
    channels = layer.moving_mean.shape[0]
    return RenormReference(
        channels,
        axis=layer.axis,
        momentum=layer.momentum,
        epsilon=layer.epsilon,
        r_max=layer.r_max,
        d_max=layer.d_max,
        warmup_steps=layer.warmup_steps,
        r_max_steps=layer.r_max_steps,
        d_max_steps=layer.d_max_steps,
        step=int(to_numpy(layer.step)),
        **values,
    )


def random_batch(rng, shape, axis, means, scales):
    """Random inputs with per-channel mean `means` and scale `scales`."""
    per_channel = [1] * len(shape)
    per_channel[axis] = -1
    x = rng.normal(size=shape) * np.reshape(scales, per_channel)
    return (x + np.reshape(means, per_channel)).astype("float32")


# id, input shape, axis, layer kwargs, clipping expected ("some" / "none"),
# per-channel input means and scales (relative to the moving statistics,
# which start near 0 and 1).
