"""The three normalizations the experiment compares, behind one factory."""

import inspect

import keras

from batch_renorm import BatchRenormalization

# name -> what it is (for --help and the docs).
NORMS = {
    "batchnorm": "keras.layers.BatchNormalization (with virtual batches: "
    "batch_renorm.BatchRenormalization with r_max 1, d_max 0 and no "
    "schedule, which is exactly batch normalization of each group)",
    "renorm": "batch_renorm.BatchRenormalization (this repository), with the "
    "paper's warm-up and r_max/d_max schedule",
    "keras-renorm": "keras.layers.BatchNormalization(renorm=True), Keras 3's "
    "own, clipped at the final r_max/d_max from the first step (it has no "
    "schedule)",
}

# BatchRenormalization's schedule arguments, which the other two ignore,
# with the layer's defaults (the paper's).
SCHEDULE_ARGS = ("r_max", "d_max", "warmup_steps", "r_max_steps", "d_max_steps")
_LAYER_DEFAULTS = inspect.signature(BatchRenormalization).parameters
SCHEDULE_DEFAULTS = {name: _LAYER_DEFAULTS[name].default
                     for name in SCHEDULE_ARGS}


def make_norm(
    norm,
    /,
    *,
    momentum=0.99,
    epsilon=1e-3,
    r_max=SCHEDULE_DEFAULTS["r_max"],
    d_max=SCHEDULE_DEFAULTS["d_max"],
    warmup_steps=SCHEDULE_DEFAULTS["warmup_steps"],
    r_max_steps=SCHEDULE_DEFAULTS["r_max_steps"],
    d_max_steps=SCHEDULE_DEFAULTS["d_max_steps"],
    virtual_batch_size=None,
    **kwargs,
):
    """A new normalization layer of the kind `norm`, channels last.

    Args:
        norm: `"batchnorm"`, `"renorm"` or `"keras-renorm"`.
        momentum, epsilon: Of the moving statistics (the fraction kept per
            step; `keras-renorm`'s `renorm_momentum` too), and added to the
            batch variance.
        r_max, d_max: Final bounds of `r` and `d`, reached through `renorm`'s
            schedule, `keras-renorm`'s from the first step.
        warmup_steps, r_max_steps, d_max_steps: The schedule of `renorm`
            (see `BatchRenormalization`); the other two ignore them.
        virtual_batch_size: None (the whole batch) or V: in training, each
            group of V consecutive examples is normalized with its own
            statistics. `batchnorm` with V is `BatchRenormalization` with
            `r_max=1`, `d_max=0` and no schedule (exactly batch
            normalization of each group; Keras's layer has no virtual
            batches); `keras-renorm` refuses it.
        **kwargs: Other arguments of both layers (`gamma_regularizer`,
            `beta_regularizer`, `name`, `dtype`, ...).
    """
    if norm not in NORMS:
        raise ValueError(f"Unknown normalization {norm!r}; expected one of "
                         f"{', '.join(NORMS)}")
    if norm == "keras-renorm" and virtual_batch_size is not None:
        raise ValueError("keras-renorm (keras.layers.BatchNormalization("
                         "renorm=True)) has no virtual batches; received "
                         f"virtual_batch_size={virtual_batch_size!r}")
    if norm == "batchnorm" and virtual_batch_size is not None:
        # Keras's BatchNormalization has no virtual batches; with r and d
        # clipped to 1 and 0 from the first step, ours is exactly BN.
        r_max, d_max, warmup_steps, r_max_steps, d_max_steps = 1.0, 0.0, 0, 0, 0
        norm = "renorm"
    if norm == "batchnorm":
        return keras.layers.BatchNormalization(
            momentum=momentum, epsilon=epsilon, **kwargs)
    if norm == "renorm":
        return BatchRenormalization(
            momentum=momentum, epsilon=epsilon, r_max=r_max, d_max=d_max,
            warmup_steps=warmup_steps, r_max_steps=r_max_steps,
            d_max_steps=d_max_steps, virtual_batch_size=virtual_batch_size,
            **kwargs)
    return keras.layers.BatchNormalization(
        momentum=momentum, epsilon=epsilon, renorm=True,
        renorm_clipping={"rmin": 1.0 / r_max, "rmax": float(r_max),
                         "dmax": float(d_max)},
        renorm_momentum=momentum, **kwargs)
