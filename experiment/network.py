"""A run's network and optimizer, from its configuration."""


def build_model(config):
    """The run's Wide ResNet, its normalization layers set as it says."""
    from models.wide_resnet import wide_resnet

    norm_kwargs = dict(momentum=config["norm_momentum"],
                       epsilon=config["norm_epsilon"])
    if config["norm"] in ("renorm", "keras-renorm"):
        norm_kwargs.update(r_max=config["r_max"], d_max=config["d_max"])
    if config["norm"] == "renorm":
        norm_kwargs.update(warmup_steps=config["warmup_steps"],
                           r_max_steps=config["r_max_steps"],
                           d_max_steps=config["d_max_steps"],
                           track_corrections=bool(
                               config.get("track_corrections")))
    if config["virtual_batch_size"] is not None:  # keras-renorm refuses it
        norm_kwargs.update(virtual_batch_size=config["virtual_batch_size"])
    return wide_resnet(config["depth"], config["width"], norm=config["norm"],
                       norm_kwargs=norm_kwargs, dropout=config["dropout"],
                       weight_decay=config["weight_decay"])


def build_training_state(model, x, y):
    """Creates the optimizer's and metrics' variables before the first
    step: Keras's TensorFlow trainer would create them while tracing it,
    then trace it again (tf.function retraces on new variables)."""
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    if hasattr(model, "_symbolic_build"):  # Keras 3's own pre-build
        model._symbolic_build(data_batch=(x, y, None))


def make_optimizer(config):
    import keras

    if config["optimizer"] == "adam":
        return keras.optimizers.Adam(learning_rate=config["lr"])
    return keras.optimizers.SGD(learning_rate=config["lr"],
                                momentum=config["sgd_momentum"],
                                nesterov=config["nesterov"])


def statistics_formulation(model):
    """How renorm layers compute statistics ("two-read", "one-read", None)."""
    return next((layer.statistics_formulation for layer in model.layers
                 if hasattr(layer, "statistics_formulation")), None)
