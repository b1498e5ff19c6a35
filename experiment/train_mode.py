"""The train/inference gap: validation in training mode by a stateless call
(no state changed; dropout off: the gap is the normalization's alone)."""

from contextlib import contextmanager

from experiment import sampling
from experiment.signals import raise_if_interrupted

# The validation plan's "epoch": distinct from every training epoch's.
PLAN_STREAM = 2**32 - 1


def batches(config, arrays):
    """The validation images in batches drawn like the training ones."""
    rng = sampling.epoch_rng(config["seed"], PLAN_STREAM)
    plan = sampling.batch_plan(arrays.y_val, rng=rng, **sampling.options(config))
    return [(arrays.x_val[index], arrays.y_val[index]) for index, _ in plan]


def batch_sums(model, trainable, non_trainable, x, y):
    """One batch's summed cross-entropy, correct predictions and penalty."""
    from keras import losses
    from keras import ops

    with dropout_off(model):
        y_pred, _, penalty = model.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True)
    y_pred = ops.cast(y_pred, "float32")
    cross_entropy = losses.sparse_categorical_crossentropy(y, y_pred)
    correct = ops.cast(ops.argmax(y_pred, axis=-1) == ops.cast(y, "int32"),
                       "float32")
    penalty = ops.sum(ops.stack([ops.cast(p, "float32") for p in penalty])
                      ) if penalty else ops.zeros(())
    return ops.sum(cross_entropy), ops.sum(correct), penalty


def evaluate(model, batches, sums=None):
    """`loss` (as Keras's val_loss) and `accuracy` over `batches` in
    training mode (NaN without); `sums`: `batch_sums`, maybe compiled."""
    from keras import ops

    sums = sums or (lambda *args: batch_sums(model, *args))
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    total = correct = count = penalty = 0.0
    for x, y in batches:
        batch = [float(ops.convert_to_numpy(value))
                 for value in sums(trainable, non_trainable, x, y)]
        total, correct, penalty = total + batch[0], correct + batch[1], batch[2]
        count += len(y)
    raise_if_interrupted()
    count = count or float("nan")
    return {"loss": total / count + penalty, "accuracy": correct / count}


@contextmanager
def dropout_off(model):
    """Every Dropout layer of `model` at rate 0 inside the block."""
    from keras import layers

    rates = [(layer, layer.rate) for layer in model._flatten_layers()
             if isinstance(layer, layers.Dropout)]
    for layer, _ in rates:
        layer.rate = 0.0
    try:
        yield
    finally:
        for layer, rate in rates:
            layer.rate = rate
