"""Wide Residual Networks (Zagoruyko & Komodakis 2016, arXiv:1605.07146):
WRN-d-k for CIFAR-10 as in the authors' code (docs/experiment.md)."""

import keras

from models.norms import make_norm


def wide_resnet(depth=16, width=4, *, norm="batchnorm", norm_kwargs=None,
                dropout=0.0, weight_decay=0.0, keras_api=keras):
    """WRN-`depth`-`width` (depth 6N + 4), a functional `keras.Model` from
    32x32 RGB images to float32 probabilities of 10 classes. `norm`: a
    `make_norm` name or a function making a layer from keyword arguments;
    `weight_decay` lambda: an L2 loss lambda / 2 * sum(w ** 2) (gradients
    gain lambda * w, as in the paper); `keras_api`: `keras` or `tf_keras`."""
    _check_arguments(depth, width, dropout, weight_decay)
    layers = _Layers(keras_api, norm, norm_kwargs, weight_decay, dropout)
    inputs = keras_api.Input((32, 32, 3), name="images")
    x = layers.conv(16, 3, 1, "stem_conv")(inputs)
    for group, (filters, strides) in enumerate(
            zip((16 * width, 32 * width, 64 * width), (1, 2, 2)), start=1):
        for index in range(1, (depth - 4) // 6 + 1):
            x = layers.block(x, filters, strides if index == 1 else 1,
                             f"group{group}_block{index}")
    x = layers.norm_relu(x, "head")
    x = keras_api.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras_api.layers.Dense(
        10, kernel_regularizer=layers.regularizer,
        bias_regularizer=layers.regularizer, name="logits")(x)
    outputs = keras_api.layers.Activation(
        "softmax", dtype="float32", name="probabilities")(x)
    return keras_api.Model(inputs, outputs, name=f"wrn-{depth}-{width}")


def _check_arguments(depth, width, dropout, weight_decay):
    if (isinstance(depth, bool) or not isinstance(depth, int) or depth < 10
            or (depth - 4) % 6):
        raise ValueError(
            f"depth must be 6N + 4 with N >= 1 (10, 16, 22, 28, 40, ...); "
            f"received depth={depth!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an integer >= 1; received {width!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1); received {dropout!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0; received {weight_decay!r}")


class _Layers:
    """The network's layers: one Keras API, weight decay, norm, dropout."""

    def __init__(self, keras_api, norm, norm_kwargs, weight_decay, dropout):
        self.api = keras_api
        self.regularizer = (keras_api.regularizers.L2(weight_decay / 2)
                            if weight_decay else None)
        self.make_norm = norm if callable(norm) else (
            lambda **kwargs: make_norm(norm, **kwargs))
        self.norm_kwargs = dict(norm_kwargs or {})
        self.dropout = dropout

    def conv(self, filters, size, strides, layer_name):
        return self.api.layers.Conv2D(
            filters, size, strides=strides, padding="same", use_bias=False,
            kernel_initializer="he_normal", kernel_regularizer=self.regularizer,
            name=layer_name)

    def norm_relu(self, x, layer_name):
        x = self.make_norm(
            gamma_regularizer=self.regularizer,
            beta_regularizer=self.regularizer, name=f"{layer_name}_norm",
            **self.norm_kwargs)(x)
        return self.api.layers.Activation("relu", name=f"{layer_name}_relu")(x)

    def block(self, x, filters, strides, layer_name):
        preactivated = self.norm_relu(x, f"{layer_name}_1")
        shortcut = x if x.shape[-1] == filters and strides == 1 else (
            self.conv(filters, 1, strides, f"{layer_name}_shortcut")(
                preactivated))
        y = self.conv(filters, 3, strides, f"{layer_name}_1_conv")(
            preactivated)
        y = self.norm_relu(y, f"{layer_name}_2")
        if self.dropout:
            y = self.api.layers.Dropout(self.dropout,
                                        name=f"{layer_name}_dropout")(y)
        y = self.conv(filters, 3, 1, f"{layer_name}_2_conv")(y)
        return self.api.layers.Add(name=f"{layer_name}_add")([shortcut, y])
