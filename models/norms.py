"""The three normalizations the experiment compares, behind one factory."""

import inspect

import keras

from batch_renorm import BatchRenormalization
from models import NORMS


# BatchRenormalization's schedule, with its defaults (the paper's).
SCHEDULE_ARGS = ("r_max", "d_max", "warmup_steps", "r_max_steps", "d_max_steps")
_LAYER_DEFAULTS = inspect.signature(BatchRenormalization).parameters
SCHEDULE_DEFAULTS = {name: _LAYER_DEFAULTS[name].default
                     for name in SCHEDULE_ARGS}


def make_norm(norm, /, *, momentum=0.99, epsilon=1e-3,
              r_max=SCHEDULE_DEFAULTS["r_max"],
              d_max=SCHEDULE_DEFAULTS["d_max"],
              warmup_steps=SCHEDULE_DEFAULTS["warmup_steps"],
              r_max_steps=SCHEDULE_DEFAULTS["r_max_steps"],
              d_max_steps=SCHEDULE_DEFAULTS["d_max_steps"],
              virtual_batch_size=None, **kwargs):
    """A new normalization layer (channels last) of the kind `norm`:
    `batchnorm` with a virtual batch size is BatchRenormalization with r_max
    1, d_max 0 and no schedule (exactly BN of each group); `keras-renorm` is
    clipped at the final r_max/d_max from the first step (docs/experiment.md).
    `kwargs` go to the layer."""
    if norm not in NORMS:
        raise ValueError(f"Unknown normalization {norm!r}; expected one of "
                         f"{', '.join(NORMS)}")
    if norm == "keras-renorm" and virtual_batch_size is not None:
        raise ValueError("keras-renorm (keras.layers.BatchNormalization("
                         "renorm=True)) has no virtual batches; received "
                         f"virtual_batch_size={virtual_batch_size!r}")
    if norm == "batchnorm" and virtual_batch_size is not None:
        r_max, d_max, warmup_steps, r_max_steps, d_max_steps = 1.0, 0.0, 0, 0, 0
        norm = "renorm"
    kwargs.update(momentum=momentum, epsilon=epsilon)
    if norm == "batchnorm":
        return keras.layers.BatchNormalization(**kwargs)
    if norm == "renorm":
        return BatchRenormalization(
            r_max=r_max, d_max=d_max, warmup_steps=warmup_steps,
            r_max_steps=r_max_steps, d_max_steps=d_max_steps,
            virtual_batch_size=virtual_batch_size, **kwargs)
    return keras.layers.BatchNormalization(
        renorm=True, renorm_momentum=momentum, renorm_clipping={
            "rmin": 1.0 / r_max, "rmax": float(r_max), "dmax": float(d_max)},
        **kwargs)
