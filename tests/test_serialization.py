"""Config, `.keras` and `.weights.h5` round trips of `BatchRenormalization`."""

import json

import numpy as np
import pytest

import keras
from keras import ops

from batch_renorm import BatchRenormalization


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def full_kwargs():
    """Every argument with a non-default value."""
    return dict(
        axis=1,
        momentum=0.9,
        epsilon=1e-2,
        beta_initializer=keras.initializers.Constant(0.25),
        gamma_initializer=keras.initializers.RandomUniform(0.5, 1.5, seed=3),
        moving_mean_initializer=keras.initializers.Constant(-0.5),
        moving_stddev_initializer=keras.initializers.Constant(2.0),
        beta_regularizer=keras.regularizers.L1(0.01),
        gamma_regularizer=keras.regularizers.L2(0.02),
        beta_constraint=keras.constraints.MaxNorm(2.0),
        gamma_constraint=keras.constraints.NonNeg(),
        r_max=2.5,
        d_max=1.5,
        warmup_steps=7,
        r_max_steps=70,
        d_max_steps=30,
        name="renorm",
    )


CONFIG_CASES = {
    "all-arguments": full_kwargs(),
    "no-center-no-scale": dict(
        center=False, scale=False, r_max=1.0, d_max=0.0, warmup_steps=0,
        r_max_steps=0, d_max_steps=0, momentum=0.0, epsilon=1e-5,
    ),
    "mixed-precision": dict(dtype="mixed_float16", axis=-2),
    "defaults": dict(),
}


@pytest.mark.parametrize(
    "kwargs", list(CONFIG_CASES.values()), ids=list(CONFIG_CASES)
)
def test_config_round_trip(kwargs):
    layer = BatchRenormalization(**kwargs)
    config = layer.get_config()
    json.dumps(config)  # plain JSON
    restored = BatchRenormalization.from_config(config)
    assert restored.get_config() == config
    # Also through Keras's generic (de)serialization, by registered name.
    generic = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(generic) is BatchRenormalization
    assert generic.get_config() == config

    default = BatchRenormalization()
    for new in (restored, generic):
        assert new.dtype_policy.name == layer.dtype_policy.name
        for name in ("axis", "momentum", "epsilon", "center", "scale",
                     "r_max", "d_max", "warmup_steps", "r_max_steps",
                     "d_max_steps"):
            assert getattr(new, name) == getattr(layer, name), name
            if name in kwargs:
                assert getattr(new, name) == kwargs[name], name
                assert getattr(new, name) != getattr(default, name), name
        for name in ("beta_initializer", "gamma_initializer",
                     "moving_mean_initializer", "moving_stddev_initializer",
                     "beta_regularizer", "gamma_regularizer",
                     "beta_constraint", "gamma_constraint"):
            old_obj, new_obj = getattr(layer, name), getattr(new, name)
            assert type(new_obj) is type(old_obj), name
            if old_obj is not None:
                assert new_obj.get_config() == old_obj.get_config(), name
            if name in kwargs:
                assert type(new_obj) is type(kwargs[name]), name


def test_restored_layer_behaves_identically():
    """The restored layer has the same weights, losses and outputs."""
    rng = np.random.default_rng(0)
    layer = BatchRenormalization(**full_kwargs())
    restored = BatchRenormalization.from_config(layer.get_config())
    x = rng.normal(1.0, 2.0, size=(6, 3, 4)).astype("float32")
    y = to_numpy(layer(x, training=True))
    y_restored = to_numpy(restored(x, training=True))
    np.testing.assert_allclose(y_restored, y, rtol=1e-6, atol=1e-6)
    for a, b in zip(layer.variables, restored.variables):
        assert a.name == b.name
        np.testing.assert_allclose(to_numpy(b), to_numpy(a), rtol=1e-6)
    # The initializers were honoured (on the moving state, as in the config).
    np.testing.assert_allclose(to_numpy(restored.beta), 0.25)
    # The regularizers and constraints are attached to the right variables.
    assert len(restored.losses) == 2
    expected_losses = sorted(
        [
            0.01 * np.sum(np.abs(to_numpy(restored.beta))),
            0.02 * np.sum(np.square(to_numpy(restored.gamma))),
        ]
    )
    np.testing.assert_allclose(
        sorted(float(to_numpy(v)) for v in restored.losses),
        expected_losses,
        rtol=1e-5,
    )
    assert isinstance(restored.gamma.constraint, keras.constraints.NonNeg)
    assert isinstance(restored.beta.constraint, keras.constraints.MaxNorm)


def build_model():
    """Two renorm layers: channels-first on rank 3, and a plain one."""
    return keras.Sequential(
        [
            keras.Input((3, 4)),
            keras.layers.Dense(5),
            BatchRenormalization(
                axis=1, momentum=0.9, r_max=2.0, d_max=1.0, warmup_steps=2,
                r_max_steps=20, d_max_steps=12,
            ),
            keras.layers.Flatten(),
            keras.layers.Dense(6),
            BatchRenormalization(
                center=False, scale=False, r_max=1.5, d_max=0.5,
                warmup_steps=0, r_max_steps=30, d_max_steps=0,
            ),
            keras.layers.Dense(1),
        ]
    )


def renorm_layers(model):
    layers = [layer for layer in model.layers
              if isinstance(layer, BatchRenormalization)]
    assert len(layers) == 2
    return layers


def trained_model(rng):
    keras.utils.set_random_seed(1)
    model = build_model()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    x = rng.normal(1.0, 2.0, size=(64, 3, 4)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for layer in renorm_layers(model):
        assert int(to_numpy(layer.step)) == 8
    return model, x, y


def assert_same_state(model, restored):
    for a, b in zip(model.weights, restored.weights):
        assert a.name == b.name
        np.testing.assert_array_equal(to_numpy(b), to_numpy(a), err_msg=a.name)
    for old, new in zip(renorm_layers(model), renorm_layers(restored)):
        assert int(to_numpy(new.step)) == int(to_numpy(old.step))
        assert new.current_r_max() == old.current_r_max()
        assert new.current_d_max() == old.current_d_max()
        new_config, old_config = new.get_config(), old.get_config()
        new_config.pop("name"), old_config.pop("name")
        assert new_config == old_config


def test_keras_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    model, x, y = trained_model(rng)
    # The schedule is in the middle of its ramp, where it must resume.
    first = renorm_layers(model)[0]
    assert 1.0 < first.current_r_max() < 2.0
    assert 0.0 < first.current_d_max() < 1.0
    path = str(tmp_path / "m.keras")
    model.save(path)
    restored = keras.saving.load_model(path)  # no custom_objects needed
    assert_same_state(model, restored)
    np.testing.assert_array_equal(
        restored.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    # Training resumes identically, from the saved step.
    for m in (model, restored):
        loss = m.train_on_batch(x[:8], y[:8])
        assert np.isfinite(loss)
    assert_same_state(model, restored)
    assert int(to_numpy(renorm_layers(restored)[0].step)) == 9


def test_weights_file_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    model, x, _ = trained_model(rng)
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    fresh = build_model()
    # Not vacuous: before loading, the fresh model has the initial state.
    assert int(to_numpy(renorm_layers(fresh)[0].step)) == 0
    assert fresh.layers[1].current_r_max() != model.layers[1].current_r_max()
    fresh.load_weights(path)
    assert_same_state(model, fresh)
    np.testing.assert_array_equal(
        to_numpy(fresh(x, training=False)), to_numpy(model(x, training=False))
    )
