"""Keras's own BatchNormalization tests, adapted to BatchRenormalization.

The test file shipped in the Keras 3.15.1 wheel,
`keras/src/layers/normalization/batch_normalization_test.py` (Copyright The
Keras Authors, Apache License 2.0), run against this layer as a user who
takes "drop-in replacement" at its word would. Every change from the
original is marked `# Adapted:` with its reason; the recurring ones:

- the layer keeps `moving_stddev = sqrt(moving_variance + epsilon)` in place
  of `moving_variance` (so `moving_stddev_initializer`, and expected values
  `sqrt(variance + epsilon)`);
- three non-trainable weights (`moving_mean`, `moving_stddev`, `step`), not
  two;
- where an output is compared with batch normalization's, the layer gets
  `r_max = 1, d_max = 0` from the first step (`TRIVIAL`), which makes
  Algorithm 1 batch normalization exactly;
- Keras's renormalization tests (`renorm=True`: test_renorm_basics,
  test_renorm_invalid_clipping_keys, test_renorm_stddev_initializer,
  test_renorm_inference, test_renorm_correctness) and the `synchronized`
  parameter are dropped: this layer has neither argument.
"""

import numpy as np
from absl.testing import parameterized

from keras.src import backend
from keras.src import layers
from keras.src import ops
from keras.src import testing
from keras.src.losses import MeanSquaredError
from keras.src.models import Model

from batch_renorm import BatchRenormalization

# Adapted: r_max = 1, d_max = 0 at every step: batch normalization exactly.
TRIVIAL = dict(
    r_max=1.0, d_max=0.0, warmup_steps=0, r_max_steps=0, d_max_steps=0
)


class BatchRenormalizationKerasTest(testing.TestCase):
    def test_bn_basics(self):
        # vector case
        self.run_layer_test(
            BatchRenormalization,
            init_kwargs={
                "center": True,
                "scale": True,
            },
            call_kwargs={"training": True},
            input_shape=(2, 3),
            expected_output_shape=(2, 3),
            expected_num_trainable_weights=2,
            # Adapted: moving_mean, moving_stddev and the step counter.
            expected_num_non_trainable_weights=3,
            expected_num_seed_generators=0,
            expected_num_losses=0,
            supports_masking=True,
        )
        self.run_layer_test(
            BatchRenormalization,
            init_kwargs={
                "center": False,
                "scale": False,
            },
            call_kwargs={"training": True},
            input_shape=(2, 3),
            expected_output_shape=(2, 3),
            expected_num_trainable_weights=0,
            expected_num_non_trainable_weights=3,  # Adapted: as above.
            expected_num_seed_generators=0,
            expected_num_losses=0,
            supports_masking=True,
        )
        # image case, with regularizers
        self.run_layer_test(
            BatchRenormalization,
            init_kwargs={
                "center": True,
                "scale": True,
                "beta_regularizer": "l2",
                "gamma_regularizer": "l2",
            },
            call_kwargs={"training": True},
            input_shape=(2, 4, 4, 3),
            expected_output_shape=(2, 4, 4, 3),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=3,  # Adapted: as above.
            expected_num_seed_generators=0,
            expected_num_losses=2,  # we have 2 regularizers.
            supports_masking=True,
        )

    @parameterized.product(
        axis=(-1, 1),
        input_shape=((5, 2, 3), (5, 3, 3, 2)),
        moving_mean_initializer=("zeros", "ones"),
        # Adapted: the moving standard deviation's initializer.
        moving_stddev_initializer=("zeros", "ones"),
    )
    def test_correctness(
        self,
        axis,
        input_shape,
        moving_mean_initializer,
        moving_stddev_initializer,
    ):
        # Training
        layer = BatchRenormalization(
            axis=axis,
            momentum=0,
            moving_mean_initializer=moving_mean_initializer,
            moving_stddev_initializer=moving_stddev_initializer,
            **TRIVIAL,  # Adapted: compared with batch normalization.
        )
        # Random data centered on 5.0, variance 10.0
        x = np.random.normal(loc=5.0, scale=10.0, size=input_shape)
        out = x
        for _ in range(3):
            out = layer(out, training=True)

        # Assert the normalization is correct.
        broadcast_shape = [1] * len(input_shape)
        broadcast_shape[axis] = input_shape[axis]
        out = backend.convert_to_numpy(out)
        out = out - np.reshape(
            backend.convert_to_numpy(layer.beta), broadcast_shape
        )
        out = out / np.reshape(
            backend.convert_to_numpy(layer.gamma), broadcast_shape
        )

        reduction_axes = list(range(len(input_shape)))
        del reduction_axes[axis]
        reduction_axes = tuple(reduction_axes)
        self.assertAllClose(np.mean(out, axis=reduction_axes), 0.0, atol=1e-3)
        self.assertAllClose(np.std(out, axis=reduction_axes), 1.0, atol=1e-3)
        self.assertAllClose(layer.moving_mean, 0.0, atol=1e-3)
        # Adapted: sqrt(variance + epsilon) of a variance of ~1 - epsilon.
        self.assertAllClose(layer.moving_stddev, 1.0, atol=1e-3)

        # Inference done before training shouldn't match.
        inference_out = layer(x, training=False)
        training_out = layer(x, training=True)
        self.assertNotAllClose(inference_out, training_out)

        # Since momentum is zero, inference after training should match.
        training_out = layer(x, training=True)
        inference_out = layer(x, training=False)
        self.assertAllClose(inference_out, training_out)

        # Masked result with no training should not differ
        x[:, 1, :] = 0.0
        unmasked_out = layer(x, training=False)
        masked = layers.Masking()(x)
        masked_out = layer(masked, training=False)
        self.assertAllClose(unmasked_out, masked_out)

        # Masked result should differ from unmasked result
        unmasked_out = layer(x, training=False)
        x[:, 1, :] = 0.0
        masked = layers.Masking()(x)
        masked_out = layer(masked, training=True)
        self.assertNotAllClose(unmasked_out, masked_out)

    # Adapted: no `synchronized` parameter.
    def test_input_fully_masked(self):
        norm = BatchRenormalization(
            scale=False,
            center=False,
        )
        x = np.zeros((4, 5))
        mask = np.zeros((4,), dtype=np.float32)
        y = norm(x, mask=mask, training=True)
        self.assertAllClose(y, np.zeros_like(x, dtype=np.float32))

    # Adapted: no `requires_trainable_backend` marker (Keras's conftest
    # defines it); TensorFlow, JAX and PyTorch all train.
    @parameterized.product(run_eagerly=(True, False), mask_value=(0.0, 0.1, 1))
    def test_bachnorm_ignore_masked_values(self, run_eagerly, mask_value):
        padded_data = np.array(
            [
                [
                    [1, 5],
                    [2, 5],
                    [mask_value, mask_value],
                    [mask_value, mask_value],
                ]
                for _ in range(10)
            ],
            dtype="float32",
        )

        inputs = layers.Input((None, 2))
        masked = layers.Masking(mask_value=mask_value)(inputs)
        # Adapted: the moving statistics do not depend on r and d, but the
        # default schedule is used here as Keras uses its defaults.
        normed = BatchRenormalization(momentum=0.0)(masked)
        model = Model(inputs, normed)
        loss = MeanSquaredError()
        model.compile(
            "rmsprop",
            loss=loss,
            run_eagerly=run_eagerly,
        )
        # Adapted: verbose=0 (the progress bar only).
        model.fit(
            x=padded_data, y=padded_data, batch_size=10, epochs=5, verbose=0
        )
        self.assertAllClose(model.layers[2].moving_mean, [1.5, 5.0])
        # Adapted: sqrt(moving_variance + epsilon) for variances 0.25 and 0.
        epsilon = model.layers[2].epsilon
        self.assertAllClose(
            model.layers[2].moving_stddev,
            np.sqrt(np.array([0.25, 0.0]) + epsilon),
        )

    def test_trainable_behavior(self):
        layer = BatchRenormalization(
            axis=-1, momentum=0.8, epsilon=1e-7, **TRIVIAL  # Adapted.
        )
        layer.build((1, 4, 4, 3))
        layer.trainable = False
        # Adapted: five weights (the three non-trainable ones above).
        self.assertEqual(len(layer.weights), 5)
        self.assertEqual(len(layer.trainable_weights), 0)
        self.assertEqual(len(layer.non_trainable_weights), 5)

        # Random data centered on 5.0, variance 10.0
        x = np.random.normal(loc=5.0, scale=10.0, size=(200, 4, 4, 3))

        out = layer(x, training=True)
        self.assertAllClose(out, x)

        layer.trainable = True
        self.assertEqual(len(layer.weights), 5)  # Adapted: as above.
        self.assertEqual(len(layer.trainable_weights), 2)
        self.assertEqual(len(layer.non_trainable_weights), 3)  # Adapted.

        for _ in range(10):
            out = layer(x, training=True)

        out = backend.convert_to_numpy(out)
        out = out - np.reshape(
            backend.convert_to_numpy(layer.beta), (1, 1, 1, 3)
        )
        out = out / np.reshape(
            backend.convert_to_numpy(layer.gamma), (1, 1, 1, 3)
        )

        self.assertAllClose(np.mean(out, axis=(0, 1, 2)), 0.0, atol=1e-3)
        self.assertAllClose(np.std(out, axis=(0, 1, 2)), 1.0, atol=1e-3)

    def test_large_value_within_autocast_scope(self):
        layer = BatchRenormalization()
        layer.build((1, 4, 4, 3))
        # Use 70000 to trigger overflow for float16
        # Adapted: the moving standard deviation.
        large_value = ops.full(layer.moving_stddev.shape, 70000)
        with backend.AutocastScope("float16"):
            layer.moving_stddev.assign(large_value)
            self.assertAllClose(layer.moving_stddev.value, large_value)

    def test_masked_broadcast_normalization(self):
        input_shape = (1, 2, 3, 4)
        mask_shape = (1, 2, 1)
        x = ops.ones(input_shape)
        mask = ops.ones(mask_shape)

        layer = BatchRenormalization(
            axis=-1, momentum=0.0, epsilon=1e-3, **TRIVIAL  # Adapted.
        )

        y = layer(x, training=True, mask=mask)

        mean_y = ops.mean(y, axis=[0, 1, 2])

        self.assertAllClose(mean_y, ops.zeros((4,)), atol=1e-6)
        self.assertAllClose(y, ops.zeros_like(y), atol=1e-6)

        self.assertAllClose(layer.moving_mean, ops.ones((4,)), atol=1e-6)
        # Adapted: sqrt(0 + epsilon).
        self.assertAllClose(
            layer.moving_stddev, ops.full((4,), np.sqrt(1e-3)), atol=1e-6
        )

    def test_invalid_momentum(self):
        # Adapted: 1.0 is invalid here too (a momentum of 1 never updates
        # the moving statistics); Keras accepts it.
        for momentum in (-0.1, 1.5, 1.0):
            with self.assertRaisesRegex(ValueError, "`momentum` must be"):
                BatchRenormalization(momentum=momentum)
        # Boundary values are accepted.
        BatchRenormalization(momentum=0.0)

    def test_serialization(self):
        # Adapted: this layer's own arguments in place of renorm=True,
        # renorm_clipping and renorm_momentum.
        layer = BatchRenormalization(
            r_max=2.5,
            d_max=4.0,
            warmup_steps=10,
            r_max_steps=30,
            d_max_steps=20,
            momentum=0.95,
        )

        config = layer.get_config()
        new_layer = BatchRenormalization.from_config(config)
        self.assertEqual(new_layer.get_config(), config)
