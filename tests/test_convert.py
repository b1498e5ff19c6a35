"""Tests of `convert_to_renorm`."""

import numpy as np
import pytest

import keras
from keras import layers
from keras import ops

from batch_renorm import BatchRenormalization
from batch_renorm import convert_to_renorm


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def all_layers(model):
    """Every layer of `model`, nested models' layers included."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def sequential_model():
    return keras.Sequential(
        [
            keras.Input((6,)),
            layers.Dense(5),
            layers.BatchNormalization(momentum=0.9, epsilon=1e-2),
            layers.ReLU(),
            layers.Dense(4),
            layers.BatchNormalization(center=False),
            layers.Dense(3),
            layers.BatchNormalization(scale=False, epsilon=0.1),
            layers.Dense(2),
        ]
    )


def functional_model():
    inputs = keras.Input((3, 4))
    a = layers.Dense(5)(inputs)
    a = layers.BatchNormalization(axis=1, name="bn_channels_first")(a)
    b = layers.Dense(5)(inputs)
    b = layers.BatchNormalization(scale=False, epsilon=0.01)(b)
    x = layers.Add()([a, b])
    x = layers.Flatten()(x)
    outputs = layers.Dense(2)(x)
    return keras.Model(inputs, outputs)


def nested_model():
    inner = keras.Sequential(
        [
            keras.Input((5,)),
            layers.Dense(4),
            layers.BatchNormalization(momentum=0.5),
            layers.ReLU(),
        ],
        name="inner",
    )
    inputs = keras.Input((6,))
    x = layers.Dense(5)(inputs)
    x = layers.BatchNormalization(center=False, scale=False)(x)
    x = inner(x)
    x = layers.BatchNormalization(epsilon=0.05)(x)
    outputs = layers.Dense(2)(x)
    return keras.Model(inputs, outputs)


def nested_in_sequential_model():
    inputs = keras.Input((4,))
    x = layers.Dense(4)(inputs)
    inner = keras.Model(inputs, layers.BatchNormalization(axis=-1)(x))
    return keras.Sequential(
        [keras.Input((6,)), layers.Dense(4), inner, layers.Dense(2)]
    )


BUILDERS = {
    "sequential": (sequential_model, (6,), 3),
    "functional": (functional_model, (3, 4), 2),
    "nested": (nested_model, (6,), 3),
    "nested-in-sequential": (nested_in_sequential_model, (6,), 1),
}


def with_trained_statistics(model, rng):
    """Gives every BatchNormalization layer nontrivial weights and stats."""
    for layer in all_layers(model):
        if type(layer) is layers.BatchNormalization:
            n = layer.moving_mean.shape[0]
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
            if layer.center:
                layer.beta.assign(rng.normal(size=n).astype("float32"))
            layer.moving_mean.assign(rng.normal(size=n).astype("float32"))
            layer.moving_variance.assign(
                rng.uniform(0.05, 4.0, n).astype("float32")
            )
    return model


def snapshot(model):
    return [
        (type(layer), [to_numpy(w).copy() for w in layer.weights])
        for layer in all_layers(model)
    ]


@pytest.mark.parametrize(
    "builder, input_shape, n_bn", list(BUILDERS.values()), ids=list(BUILDERS)
)
def test_convert_keeps_inference_and_statistics(builder, input_shape, n_bn):
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    original = with_trained_statistics(builder(), rng)
    x = rng.normal(0.5, 2.0, size=(8,) + input_shape).astype("float32")
    expected = to_numpy(original(x, training=False))
    before = snapshot(original)

    converted = convert_to_renorm(original, r_max=2.0, warmup_steps=0)

    assert type(converted) is type(original)
    assert converted is not original
    old_bns = [
        layer for layer in all_layers(original)
        if isinstance(layer, layers.BatchNormalization)
    ]
    assert len(old_bns) == n_bn
    new_layers = list(all_layers(converted))
    assert not any(isinstance(layer, layers.BatchNormalization)
                   for layer in new_layers)
    renorms = {
        layer.name: layer for layer in new_layers
        if isinstance(layer, BatchRenormalization)
    }
    assert sorted(renorms) == sorted(layer.name for layer in old_bns)
    for bn in old_bns:
        brn = renorms[bn.name]
        for name in ("axis", "epsilon", "momentum", "center", "scale"):
            assert getattr(brn, name) == getattr(bn, name), name
        # The renorm arguments are passed through; the others are defaults.
        assert brn.r_max == 2.0 and brn.warmup_steps == 0
        default = BatchRenormalization()
        assert brn.d_max == default.d_max
        assert brn.r_max_steps == default.r_max_steps
        assert brn.d_max_steps == default.d_max_steps
        assert int(to_numpy(brn.step)) == 0
        np.testing.assert_allclose(
            to_numpy(brn.moving_stddev),
            np.sqrt(to_numpy(bn.moving_variance).astype(float) + bn.epsilon),
            rtol=1e-6,
        )
        np.testing.assert_array_equal(
            to_numpy(brn.moving_mean), to_numpy(bn.moving_mean)
        )
        if bn.scale:
            np.testing.assert_array_equal(
                to_numpy(brn.gamma), to_numpy(bn.gamma)
            )
        else:
            assert brn.gamma is None
        if bn.center:
            np.testing.assert_array_equal(
                to_numpy(brn.beta), to_numpy(bn.beta)
            )
        else:
            assert brn.beta is None

    np.testing.assert_allclose(
        to_numpy(converted(x, training=False)), expected, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        converted.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6
    )

    # The original is unchanged, and shares no variables with the copy.
    assert _same(snapshot(original), before)
    for brn in renorms.values():
        brn.moving_mean.assign(np.full(brn.moving_mean.shape, 7.0, "float32"))
    for layer in all_layers(converted):
        if isinstance(layer, layers.Dense):
            layer.kernel.assign(np.zeros(layer.kernel.shape, "float32"))
    assert _same(snapshot(original), before)
    np.testing.assert_array_equal(
        to_numpy(original(x, training=False)), expected
    )


def _same(a, b):
    if len(a) != len(b):
        return False
    for (type_a, weights_a), (type_b, weights_b) in zip(a, b):
        if type_a is not type_b or len(weights_a) != len(weights_b):
            return False
        if not all(np.array_equal(u, v) for u, v in zip(weights_a, weights_b)):
            return False
    return True


def test_converted_model_trains_with_renorm():
    rng = np.random.default_rng(1)
    original = with_trained_statistics(sequential_model(), rng)
    converted = convert_to_renorm(
        original, r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=0,
        d_max_steps=0, momentum=0.5,
    )
    renorms = [
        layer for layer in converted.layers
        if isinstance(layer, BatchRenormalization)
    ]
    assert len(renorms) == 3
    assert all(layer.momentum == 0.5 and layer.current_r_max() == 1.5
               for layer in renorms)
    converted.compile(keras.optimizers.SGD(0.01), "mse")
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    means = [to_numpy(layer.moving_mean).copy() for layer in renorms]
    before = snapshot(original)
    history = converted.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    for layer, mean in zip(renorms, means):
        assert int(to_numpy(layer.step)) == 2
        assert not np.allclose(to_numpy(layer.moving_mean), mean)
    # The original was not trained along.
    assert _same(snapshot(original), before)


@pytest.mark.parametrize(
    "not_a_model",
    [layers.Dense(2), layers.BatchNormalization(), None, "model", [1, 2]],
    ids=["dense", "batch-norm", "none", "str", "list"],
)
def test_convert_rejects_non_models(not_a_model):
    with pytest.raises(ValueError):
        convert_to_renorm(not_a_model)
