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

# BatchRenormalization's schedule, with its defaults (the paper's).
SCHEDULE_ARGS = ("r_max", "d_max", "warmup_steps", "r_max_steps", "d_max_steps")
_LAYER_DEFAULTS = inspect.signature(BatchRenormalization).parameters
SCHEDULE_DEFAULTS = {name: _LAYER_DEFAULTS[name].default
                     for name in SCHEDULE_ARGS}


def make_norm(norm, /, *, momentum=0.99, epsilon=1e-3,
              r_max=SCHEDULE_DEFAULTS["r_max"], d_max=SCHEDULE_DEFAULTS["d_max"],
              warmup_steps=SCHEDULE_DEFAULTS["warmup_steps"],
              r_max_steps=SCHEDULE_DEFAULTS["r_max_steps"],
              d_max_steps=SCHEDULE_DEFAULTS["d_max_steps"],
              virtual_batch_size=None, **kwargs):
    """A new normalization layer of the kind `norm` (a key of `NORMS`),
    channels last. `momentum` and `epsilon` are those of the moving
    statistics (and `keras-renorm`'s `renorm_momentum`); `r_max`, `d_max`
    the final bounds (`keras-renorm`'s from the first step); the schedule
    is `renorm`'s alone. `virtual_batch_size` V: each group of V examples
    normalized with its own statistics (not `keras-renorm`). Other
    `kwargs` go to the layer (`name`, regularizers, `dtype`, ...)."""
    if norm not in NORMS:
        raise ValueError(f"Unknown normalization {norm!r}; expected one of "
                         f"{', '.join(NORMS)}")
    if norm == "keras-renorm" and virtual_batch_size is not None:
        raise ValueError("keras-renorm (keras.layers.BatchNormalization("
                         "renorm=True)) has no virtual batches; received "
                         f"virtual_batch_size={virtual_batch_size!r}")
    if norm == "batchnorm" and virtual_batch_size is not None:
        # Keras's has no virtual batches; ours with r = 1, d = 0 is BN.
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
