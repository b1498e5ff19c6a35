"""The Wide ResNet builder and the normalization factory (models/)."""

import keras
import numpy as np
import pytest

from batch_renorm import BatchRenormalization
from models import NORMS
from models.norms import make_norm
from models.wide_resnet import wide_resnet

# WRN-16-4: 2,742,704 convolution weights + 2,570 dense + 2 * 1,808 gamma and
# beta of the 13 normalization layers.
WRN_16_4_TRAINABLE = 2_748_890


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("norm", list(NORMS))
def test_wrn_16_4_parameters_and_output(norm):
    model = wide_resnet(16, 4, norm=norm)
    assert trainable_count(model) == WRN_16_4_TRAINABLE
    assert model.count_params() == pytest.approx(2.75e6, rel=0.01)
    assert model.output_shape == (None, 10)
    assert model.input_shape == (None, 32, 32, 3)
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3))
    probabilities = keras.ops.convert_to_numpy(model(images.astype("float32")))
    assert probabilities.shape == (2, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_wrn_layout():
    depth, width = 22, 2
    blocks = (depth - 4) // 6
    model = wide_resnet(depth, width, norm="renorm")
    convs = [layer for layer in model.layers
             if isinstance(layer, keras.layers.Conv2D)]
    norms = [layer for layer in model.layers
             if isinstance(layer, BatchRenormalization)]
    shortcuts = [c for c in convs if c.name.endswith("_shortcut")]
    # stem + two per block + a 1x1 shortcut where the shape changes
    assert len(convs) == 1 + 6 * blocks + 3
    assert [c.kernel_size for c in shortcuts] == [(1, 1)] * 3
    assert [c.strides for c in shortcuts] == [(1, 1), (2, 2), (2, 2)]
    assert [c.filters for c in shortcuts] == [16 * width, 32 * width, 64 * width]
    assert all(not c.use_bias for c in convs)
    assert all(type(c.kernel_initializer).__name__ == "HeNormal" for c in convs)
    assert len(norms) == 6 * blocks + 1  # two per block and one at the head
    # The last group works at 8x8 with 64k channels, before global pooling.
    pool = model.get_layer("pool")
    assert tuple(pool.input.shape) == (None, 8, 8, 64 * width)


def test_width_one_first_group_has_identity_shortcut():
    model = wide_resnet(10, 1)
    names = [layer.name for layer in model.layers]
    assert "group1_block1_shortcut" not in names  # 16 -> 16 channels
    assert "group2_block1_shortcut" in names


def test_normalization_kinds():
    model = wide_resnet(10, 1, norm="keras-renorm",
                        norm_kwargs=dict(momentum=0.9, epsilon=1e-5, r_max=2.0,
                                         d_max=1.5, warmup_steps=7))
    layers = [layer for layer in model.layers
              if isinstance(layer, keras.layers.BatchNormalization)]
    assert layers and all(layer.renorm for layer in layers)
    assert layers[0].renorm_clipping == {"rmin": 0.5, "rmax": 2.0, "dmax": 1.5}
    assert layers[0].momentum == 0.9 and layers[0].epsilon == 1e-5

    bn = make_norm("batchnorm", momentum=0.9, r_max=2.0, warmup_steps=3)
    assert type(bn) is keras.layers.BatchNormalization and not bn.renorm
    brn = make_norm("renorm", momentum=0.9, epsilon=1e-5, r_max=2.0, d_max=1.0,
                    warmup_steps=10, r_max_steps=20, d_max_steps=30, name="n")
    assert isinstance(brn, BatchRenormalization) and brn.name == "n"
    assert (brn.momentum, brn.epsilon, brn.r_max, brn.d_max) == (
        0.9, 1e-5, 2.0, 1.0)
    assert (brn.warmup_steps, brn.r_max_steps, brn.d_max_steps) == (10, 20, 30)
    with pytest.raises(ValueError, match="Unknown normalization"):
        make_norm("groupnorm")


def test_virtual_batches_of_each_norm():
    """batchnorm with V: our layer in its exact BN mode (bounds 1 and 0, no
    schedule), so each group of V is batch-normalized on its own; renorm
    passes V on; keras-renorm has none."""
    bn = make_norm("batchnorm", momentum=0.9, epsilon=1e-3,
                   virtual_batch_size=4, name="g")
    assert isinstance(bn, BatchRenormalization) and bn.name == "g"
    assert (bn.r_max, bn.d_max, bn.warmup_steps, bn.r_max_steps,
            bn.d_max_steps) == (1.0, 0.0, 0, 0, 0)
    assert (bn.momentum, bn.epsilon, bn.virtual_batch_size) == (0.9, 1e-3, 4)
    x = np.random.default_rng(0).normal(2.0, 3.0, (12, 5)).astype("float32")
    y = keras.ops.convert_to_numpy(bn(x, training=True))
    groups = x.reshape(3, 4, 5)
    expected = (groups - groups.mean(1, keepdims=True)) / np.sqrt(
        groups.var(1, keepdims=True) + 1e-3)
    np.testing.assert_allclose(y, expected.reshape(12, 5), atol=1e-4)
    brn = make_norm("renorm", virtual_batch_size=8)
    assert isinstance(brn, BatchRenormalization)
    assert brn.virtual_batch_size == 8 and brn.r_max == 3.0
    assert make_norm("renorm").virtual_batch_size is None
    assert type(make_norm("batchnorm")) is keras.layers.BatchNormalization
    with pytest.raises(ValueError, match=r"keras-renorm .* has no virtual"):
        make_norm("keras-renorm", virtual_batch_size=4)


def test_dropout_and_weight_decay():
    plain = wide_resnet(10, 1)
    assert not plain.losses
    assert not any(isinstance(layer, keras.layers.Dropout)
                   for layer in plain.layers)
    model = wide_resnet(10, 1, dropout=0.3, weight_decay=5e-4)
    dropouts = [layer for layer in model.layers
                if isinstance(layer, keras.layers.Dropout)]
    assert len(dropouts) == 3 and all(d.rate == 0.3 for d in dropouts)
    # One L2 term per trainable weight, lambda / 2 * sum(w ** 2) each.
    assert len(model.losses) == len(model.trainable_weights)
    expected = sum(2.5e-4 * float(np.sum(np.square(w.numpy())))
                   for w in model.trainable_weights)
    total = sum(float(keras.ops.convert_to_numpy(loss))
                for loss in model.losses)
    assert total == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("depth", [8, 12, 0, 16.0])
def test_bad_depth(depth):
    with pytest.raises(ValueError, match="6N"):
        wide_resnet(depth, 1)


def test_mixed_precision_output_is_float32(restore_dtype_policy):
    keras.config.set_dtype_policy("mixed_float16")
    model = wide_resnet(10, 1, norm="renorm")
    assert model.get_layer("stem_conv").compute_dtype == "float16"
    out = model(np.zeros((2, 32, 32, 3), "float32"))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
