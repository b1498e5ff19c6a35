"""Batch Renormalization (Ioffe, 2017; arXiv:1702.03275) for Keras 3.

`BatchRenormalization` is a drop-in replacement for
`keras.layers.BatchNormalization` that implements Algorithm 1 of the paper
exactly, with the paper's warm-up and linear relaxation of `r_max`/`d_max`.
It is written with `keras.ops` only, so it runs unchanged on the TensorFlow,
JAX and PyTorch backends, eagerly and compiled.

`convert_to_renorm(model)` returns a copy of a Keras model in which every
`BatchNormalization` layer is a `BatchRenormalization` layer with the same
inference behaviour, for fine-tuning pretrained networks with small or
non-i.i.d. minibatches.
"""

import functools
import math
import numbers

import keras
from keras import constraints
from keras import initializers
from keras import ops
from keras import regularizers

__all__ = [
    "BatchRenormalization",
    "convert_to_renorm",
    "has_fast_path",
    "renorm_bounds",
    "renorm_ramp",
]
__version__ = "0.1.0"


def renorm_ramp(step, warmup_steps, ramp_end, clip=None):
    """How far a bound has relaxed at training step `k`: `t(k) = 0` for
    `k < warmup_steps`, else `min(1, (k - warmup_steps) / (ramp_end -
    warmup_steps))`, and `t = 1` from the warm-up's end where `ramp_end <=
    warmup_steps`. `step` is a whole number, as a Python number or a tensor;
    `clip(value, low, high)` clips one of its kind (default `ops.clip`,
    which makes `t` a float32 tensor)."""
    if clip is None:
        step, clip = ops.cast(step, "float32"), ops.clip
    span = ramp_end - warmup_steps
    # With no span, (k - warmup_steps + 1) clips to 0 before, 1 from the end
    # of the warm-up.
    return clip((step - warmup_steps + (span <= 0)) / max(span, 1), 0.0, 1.0)


def renorm_bounds(step, r_max, d_max, warmup_steps, r_max_steps, d_max_steps,
                  clip=None):
    """The clipping bounds `(r_max(k), d_max(k))` used at training step `k`:
    `r_max(k) = 1 + (r_max - 1) * t_r(k)` and `d_max(k) = d_max * t_d(k)`,
    with `t_r`, `t_d` the ramps (`renorm_ramp`) that end at `r_max_steps`
    and `d_max_steps`. `step` may be a Python number or a tensor (`clip` as
    in `renorm_ramp`; by default the bounds are float32 tensors).
    """
    if clip is None:
        step, clip = ops.cast(step, "float32"), ops.clip
    return (1.0 + (r_max - 1.0) * renorm_ramp(step, warmup_steps, r_max_steps,
                                              clip),
            d_max * renorm_ramp(step, warmup_steps, d_max_steps, clip))


# One-read variances lose at most log10 of this of float32's digits; beyond,
# the variance is computed again around the mean (`_moments`).
_CANCELLATION_LIMIT = 1e3

# E[x^2] is accumulated scaled by this power of two (exact), so that it stays
# finite for |x| up to ~8e28. In float32 the scaled squares of |x| < 2^-31
# are subnormal (flushed to zero on CPUs), an error below 2^-62 in the
# variance: below float32's rounding of `variance + epsilon` unless epsilon
# is under `_UNDERFLOW_EPSILON`; with such an epsilon, a channel with
# E[x^2] < 2^-36 (scaled: `_SQUARE_UNDERFLOW`) is recomputed around the mean.
_SQUARE_SCALE = 2.0**-64
_SQUARE_UNDERFLOW = 2.0**-100
_SQUARE_SCALED_MAX = 2.0**62
_UNDERFLOW_EPSILON = 2.0**-38

# What `BatchRenormalization.corrections()` returns, besides `steps`, in the
# order of the layer's `correction_sums`.
_CORRECTION_KEYS = ("r_dev", "d_dev", "r_clipped", "d_clipped")

# The smallest epsilon that TensorFlow's fused kernel accepts (it silently
# raises smaller ones to this, as cuDNN requires).
_FUSED_MIN_EPSILON = 1.001e-5


def _check_number(name, value, ok, requirement):
    """Returns `value` as a float, or raises a ValueError naming it."""
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not is_number or math.isnan(value) or not ok(value):
        raise ValueError(
            f"Argument `{name}` must be {requirement}. Received: {name}={value!r}"
        )
    return value


def _check_steps(name, value):
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not is_int or value < 0:
        raise ValueError(
            f"Argument `{name}` must be a non-negative integer. "
            f"Received: {name}={value!r}"
        )
    return int(value)


@keras.saving.register_keras_serializable(package="batch_renorm")
class BatchRenormalization(keras.layers.Layer):
    """Batch Renormalization layer (Ioffe, 2017), Algorithm 1 exactly.

    Like batch normalization, it normalizes each channel with the statistics
    of the minibatch during training, and with moving statistics during
    inference. Unlike it, training-mode outputs are corrected towards what
    inference would give, so that they depend less on the other examples of
    the minibatch; this matters for small or non-i.i.d. minibatches.

    **During training** (`training=True`), per channel, with `mu` and `sigma`
    the moving mean and moving standard deviation:

    - `mu_B = mean(x)`, `sigma_B = sqrt(var(x) + epsilon)` over the batch
      (biased variance, all axes but `axis`);
    - `r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))`;
    - `d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))`;
    - `y = gamma * ((x - mu_B) / sigma_B * r + d) + beta`;
    - then `mu <- mu + (1 - momentum) * (mu_B - mu)` and
      `sigma <- sigma + (1 - momentum) * (sigma_B - sigma)`, and the step
      counter is incremented.

    Since `r` and `d` are constants for the gradient,
    `y = (gamma * r) * x_hat + (gamma * d + beta)`: batch normalization with
    a per-channel adjusted scale and offset.

    A training call on an empty batch (a dimension of size 0) changes
    nothing but the step counter.

    **Virtual batches** (`virtual_batch_size=V`): in training the batch axis
    is split into groups of `V` consecutive examples (the last group holds
    the remaining `N mod V` where `V` does not divide the batch size `N`),
    and each group `g` is normalized as its own minibatch, with its own
    `mu_g`, `sigma_g`, `r_g`, `d_g` against the shared moving statistics, as
    if each group were one worker of a data-parallel step. The moving
    statistics are updated once per step, towards the mean over groups of
    `mu_g` and of `sigma_g`: `mu <- mu + (1 - momentum) * (mean_g mu_g - mu)`,
    the same update that the workers' own updates, averaged, would give.
    (tf.keras's ghost batches average the group variances, for a moving
    variance; its groups are strided, examples `g, g + N/V, ...`.) With
    `r_max = 1`, `d_max = 0` this is ghost batch normalization.

    **Distributed training.** Under JAX's `keras.distribution.DataParallel`
    the step is one SPMD program and the statistics are those of the global
    batch; `virtual_batch_size` equal to the per-device batch gives each
    device its own. Under a `tf.distribute` strategy each replica normalizes
    with its own examples' statistics, and the moving statistics take the
    mean of the replicas' updates (mean-aggregated variables); with
    `synchronized=True` the moments are all-reduced over the replicas (the
    global batch's), as in BatchNormalization.

    **During inference** (`training=False`, the default, or
    `trainable=False`): `y = gamma * (x - mu) / sigma + beta`. The layer's
    state is never changed.

    **Schedule.** The call made while the step counter reads `k` clips with
    `r_max(k) = 1 + (r_max - 1) * t_r(k)` and `d_max(k) = d_max * t_d(k)`,
    where `t(k) = 0` for `k < warmup_steps`, then grows linearly to 1, reached
    at step `r_max_steps` (for `t_r`) or `d_max_steps` (for `t_d`); `t = 1`
    where those steps are `<= warmup_steps`. So the layer starts as plain
    batch normalization (`r_max = 1`, `d_max = 0`), as in the paper, and
    `warmup_steps = r_max_steps = d_max_steps = 0` gives fixed clipping from
    the first step. The counter is a (non-trainable) variable of the layer,
    so the schedule survives saving, loading and resuming.

    **Mixed precision.** Statistics, `r` and `d` are computed in float32 and
    the variables are float32; the output has the layer's compute dtype.

    **Watching the corrections** (`track_corrections=True`): each training
    call also adds, inside the step, its means over channels (and groups)
    of `|r - 1|`, `|d|`, and of whether `sigma_B / sigma` lay strictly
    outside `[1 / r_max(k), r_max(k)]` and `|mu_B - mu| / sigma` strictly
    above `d_max(k)`, to a float32 variable `correction_sums`;
    `corrections(reset=True)` returns their means over the calls since the
    last reset. The sums are per-session state: not saved with the layer
    (a loaded layer starts from zero; its files are those of a layer
    without tracking).

    Args:
        axis: Integer, the channel axis to normalize (`-1` for channels-last,
            `1` after a channels-first convolution).
        momentum: Momentum of the moving mean and moving standard deviation,
            in `[0, 1)`, in Keras's convention (`0.99` keeps 99% of the old
            value at each step).
        epsilon: Small positive float added to the variance.
        center: If `True`, add the learned offset `beta`.
        scale: If `True`, multiply by the learned scale `gamma`.
        beta_initializer: Initializer for `beta`.
        gamma_initializer: Initializer for `gamma`.
        moving_mean_initializer: Initializer for the moving mean `mu`.
        moving_stddev_initializer: Initializer for the moving standard
            deviation `sigma` (not a variance).
        beta_regularizer: Optional regularizer for `beta`.
        gamma_regularizer: Optional regularizer for `gamma`.
        beta_constraint: Optional constraint for `beta`.
        gamma_constraint: Optional constraint for `gamma`.
        r_max: Final bound of `r`, `>= 1` (the paper uses 3).
        d_max: Final bound of `d`, `>= 0` (the paper uses 5).
        warmup_steps: Training steps of plain batch normalization
            (`r_max = 1`, `d_max = 0`) before the bounds start to grow.
        r_max_steps: Step at which `r_max` reaches its final value; `0` or a
            value `>= warmup_steps`.
        d_max_steps: Step at which `d_max` reaches its final value; `0` or a
            value `>= warmup_steps`.
        fused: `None` (default) to normalize with the backend's fused kernel
            in training where it applies (TensorFlow or PyTorch, rank-4
            channels-last inputs, no mask; on TensorFlow also
            `epsilon >= 1.001e-5`, a compute dtype other than float64
            (the kernel has no double version), and not under XLA, `jit_compile=True`,
            where the portable path is the faster one), `False` never to,
            `True` to require it (an error where it does not apply). The
            same Algorithm 1 either way, up to float rounding.
        **kwargs: Base layer keyword arguments (e.g. `name` and `dtype`).

        virtual_batch_size: `None` (default) to normalize over the whole batch,
            or a positive integer `V`: groups of `V` consecutive examples
            normalized each on its own in training (see above). On the
            fused path (TensorFlow, PyTorch) whole groups of a batch of known
            size take the kernel per group and channel; other batches (a
            smaller last group, an unknown size in a TensorFlow graph, a
            mask) take the portable path.
        synchronized: TensorFlow only: under a `tf.distribute` strategy,
            take the batch statistics over all replicas (all-reduced) rather
            than each replica's own. Outside a strategy, no effect.
        track_corrections: If `True`, training calls also sum what `r` and
            `d` do, for `corrections()` (see above); `False` (default) adds
            no variable and no computation.

    Call arguments:
        inputs: Input tensor of any rank.
        training: Python boolean, whether to normalize with the batch
            statistics (and update the state) or with the moving statistics.
        mask: Optional boolean tensor with one dimension less than `inputs`;
            masked positions are left out of the batch statistics.

    Variables: `gamma`, `beta` (trainable, when enabled), `moving_mean`,
    `moving_stddev`, the integer step counter `step` and, with
    `track_corrections`, `correction_sums` (non-trainable).
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_stddev_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        r_max=3.0,
        d_max=5.0,
        warmup_steps=5000,
        r_max_steps=40000,
        d_max_steps=25000,
        fused=None,
        virtual_batch_size=None,
        synchronized=False,
        track_corrections=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if fused is not None and not isinstance(fused, bool):
            raise ValueError(
                "Argument `fused` must be None, True or False. "
                f"Received: fused={fused!r}"
            )
        if fused and not has_fast_path():
            raise ValueError(
                "Argument `fused=True` needs a backend with a fused kernel "
                f"({', '.join(_FAST_PATH_BACKENDS)}); the backend is "
                f"{keras.backend.backend()}. "
                "Received: fused=True"
            )
        self.fused = fused
        if virtual_batch_size is not None and (
            not isinstance(virtual_batch_size, numbers.Integral)
            or isinstance(virtual_batch_size, bool)
            or virtual_batch_size <= 0
        ):
            raise ValueError(
                "Argument `virtual_batch_size` must be None or a positive "
                f"integer. Received: virtual_batch_size={virtual_batch_size!r}"
            )
        self.virtual_batch_size = (
            None if virtual_batch_size is None else int(virtual_batch_size)
        )
        if not isinstance(synchronized, bool):
            raise ValueError(
                "Argument `synchronized` must be True or False. "
                f"Received: synchronized={synchronized!r}"
            )
        if synchronized and keras.backend.backend() != "tensorflow":
            # As BatchNormalization: on JAX, DataParallel already gives
            # global statistics (one SPMD program).
            raise ValueError(
                "Argument `synchronized=True` is only supported with the "
                "TensorFlow backend (under a tf.distribute strategy); the "
                f"backend is {keras.backend.backend()}. "
                "Received: synchronized=True"
            )
        if synchronized and self.virtual_batch_size is not None:
            raise ValueError(
                "Arguments `synchronized=True` (statistics of the whole "
                "global batch) and `virtual_batch_size` (statistics per group) "
                "exclude each other. Received: synchronized=True, "
                f"virtual_batch_size={self.virtual_batch_size}"
            )
        self.synchronized = synchronized
        if not isinstance(track_corrections, bool):
            raise ValueError(
                "Argument `track_corrections` must be True or False. "
                f"Received: track_corrections={track_corrections!r}"
            )
        self.track_corrections = track_corrections
        if not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
            raise ValueError(
                f"Argument `axis` must be an integer. Received: axis={axis!r}"
            )
        self.axis = int(axis)
        self.momentum = float(
            _check_number(
                "momentum", momentum, lambda m: 0 <= m < 1, "in [0, 1)"
            )
        )
        self.epsilon = float(
            _check_number("epsilon", epsilon, lambda e: e > 0, "positive")
        )
        self.r_max = float(
            _check_number("r_max", r_max, lambda r: 1 <= r < math.inf, ">= 1")
        )
        self.d_max = float(
            _check_number("d_max", d_max, lambda d: 0 <= d < math.inf, ">= 0")
        )
        self.warmup_steps = _check_steps("warmup_steps", warmup_steps)
        self.r_max_steps = _check_steps("r_max_steps", r_max_steps)
        self.d_max_steps = _check_steps("d_max_steps", d_max_steps)
        for name in ("r_max_steps", "d_max_steps"):
            steps = getattr(self, name)
            if steps != 0 and steps < self.warmup_steps:
                raise ValueError(
                    f"Argument `{name}` must be 0 or >= warmup_steps "
                    f"({self.warmup_steps}). Received: {name}={steps}"
                )
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_stddev_initializer = initializers.get(
            moving_stddev_initializer
        )
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.supports_masking = True

        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_stddev = None
        self.step = None
        self.correction_sums = None
        self._reduction_axes = None
        self._fast_path = False
        # None: the statistics' formulation follows the device of each call
        # (`statistics_formulation`); True or False fixes it (the tests).
        self._one_read = None

    def build(self, input_shape):
        ndim = len(input_shape)
        if not -ndim <= self.axis < ndim:
            raise ValueError(
                f"Argument `axis` is out of range for inputs of rank {ndim} "
                f"(shape {tuple(input_shape)}). Received: axis={self.axis}"
            )
        if self.virtual_batch_size is not None and self.axis % ndim == 0:
            raise ValueError(
                "With `virtual_batch_size`, axis 0 is the batch axis that is "
                "split into groups, so it cannot be the channel axis. "
                f"Received: axis={self.axis}, "
                f"virtual_batch_size={self.virtual_batch_size}"
            )
        channels = input_shape[self.axis]
        if channels is None:
            raise ValueError(
                "The channel dimension of the inputs must be known. Received: "
                f"input_shape={tuple(input_shape)}, axis={self.axis}"
            )
        shape = (channels,)

        def variable(name, initializer, trainable=False, shape=shape,
                     **kwargs):
            return self.add_weight(shape=shape, name=name,
                                   initializer=initializer,
                                   trainable=trainable, autocast=False,
                                   **kwargs)

        if self.scale:
            self.gamma = variable(
                "gamma", self.gamma_initializer, True,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint)
        if self.center:
            self.beta = variable(
                "beta", self.beta_initializer, True,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint)
        # Under tf.distribute each replica assigns its own update; the
        # variables take their mean (with "none", as BatchNormalization has,
        # the replicas' copies silently drift apart).
        self.moving_mean = variable(
            "moving_mean", self.moving_mean_initializer, aggregation="mean")
        self.moving_stddev = variable(
            "moving_stddev", self.moving_stddev_initializer,
            aggregation="mean")
        # "int" is int64 where the backend allows it and int32 on JAX; the
        # first replica's, as the optimizers' iteration counter.
        self.step = variable("step", "zeros", shape=(), dtype="int",
                             aggregation="only_first_replica")
        if self.track_corrections:
            # One variable, one assignment per call: the sums over training
            # calls of each call's four means (`corrections`), then the
            # number of calls. Not saved (`save_own_variables`). Under
            # tf.distribute: the mean of the replicas' sums, as if each
            # replica were a group.
            self.correction_sums = variable(
                "correction_sums", "zeros", dtype="float32",
                shape=(len(_CORRECTION_KEYS) + 1,), aggregation="mean")
        self.input_spec = keras.layers.InputSpec(
            ndim=ndim, axes={self.axis: channels}
        )
        axis = self.axis % ndim
        self._reduction_axes = [i for i in range(ndim) if i != axis]
        self._fast_path = self._fast_path_applies(ndim, axis)

    def _fast_path_applies(self, ndim, axis):
        """Whether training calls take the fused kernel (see `fused`)."""
        if self.fused is False or not has_fast_path():
            return False
        reasons = []
        if (ndim, axis) != (4, 3):
            reasons.append(f"inputs of rank 4 with axis=-1 (rank {ndim}, "
                           f"axis={self.axis})")
        if (
            keras.backend.backend() == "tensorflow"
            and self.epsilon < _FUSED_MIN_EPSILON
        ):
            reasons.append(f"epsilon >= {_FUSED_MIN_EPSILON} "
                           f"(epsilon={self.epsilon})")
        if not self._fused_dtype_ok(self.compute_dtype):
            # FusedBatchNormV3 has no double kernel.
            reasons.append("a compute dtype other than float64 "
                           f"(dtype policy {self.dtype_policy.name})")
        if reasons and self.fused:
            raise ValueError(
                "Argument `fused=True`: the fused kernel needs "
                + " and ".join(reasons) + ". Received: fused=True"
            )
        return not reasons

    @staticmethod
    def _fused_dtype_ok(dtype):
        """Whether the fused kernel takes statistics in `dtype` (that of the
        inputs cast to at least float32)."""
        dtype = keras.backend.standardize_dtype(dtype)
        return keras.backend.backend() != "tensorflow" or dtype != "float64"

    @property
    def uses_fast_path(self):
        """Whether training calls (without a mask, and on TensorFlow not
        under XLA) take the backend's fused kernel; known once the layer is
        built."""
        return self._fast_path

    @property
    def statistics_formulation(self):
        """How training calls on the portable path without a mask compute
        the batch statistics, on the device that this layer computes on:
        `"two-read"` (the mean, then the mean squared deviation, as Keras's
        BatchNormalization) or `"one-read"` (`E[x]` and `E[x^2]` in one read
        of `x`; see `_moments`). Two reads on any device but a CPU (GPUs,
        TPUs), and on a CPU with AVX-512; one read on other CPUs. The fused
        kernels (`uses_fast_path`) compute their own statistics."""
        one_read = self._one_read
        if one_read is None:
            probe = None if self.moving_mean is None else self.moving_mean.value
            one_read = _one_read_moments(_device_type(probe))
        return "one-read" if one_read else "two-read"

    def compute_output_shape(self, input_shape):
        return input_shape

    def bounds(self, step=None):
        """The `(r_max, d_max)` tensors used by a training call at `step`.

        `step` defaults to the layer's current step counter (0 before build).
        """
        if step is None:
            step = 0 if self.step is None else self.step
        return renorm_bounds(
            step,
            self.r_max,
            self.d_max,
            self.warmup_steps,
            self.r_max_steps,
            self.d_max_steps,
        )

    def current_r_max(self):
        """The `r_max` that the next training call will clip with (a float)."""
        return float(ops.convert_to_numpy(self.bounds()[0]))

    def current_d_max(self):
        """The `d_max` that the next training call will clip with (a float)."""
        return float(ops.convert_to_numpy(self.bounds()[1]))

    def corrections(self, reset=True):
        """What `r` and `d` did since the last reset (`track_corrections=True`).

        Means over the training calls since the last reset of each call's
        mean over channels (and groups, with virtual batches; groups without
        an unmasked position left out), as a dict of Python floats:

        - `r_dev`: `|r - 1|`, `r` after clipping;
        - `d_dev`: `|d|`, after clipping;
        - `r_clipped`: the fraction where `sigma_B / sigma` lies strictly
          outside `[1 / r_max(k), r_max(k)]`, the bounds of that call;
        - `d_clipped`: the fraction where `|mu_B - mu| / sigma > d_max(k)`;
        - `steps`: the number of training calls counted (an int).

        During the warm-up (`r_max(k) = 1`, `d_max(k) = 0`), `r = 1` and
        `d = 0`, and a channel counts as clipped wherever its batch statistic
        differs from the moving one at all. With no call counted, `steps` is
        0 and the four means are NaN. The sums are float32, updated inside
        each training call; on JAX, `model.fit` holds them outside the layer
        during an epoch, so read them between epochs (`on_epoch_end`).

        Args:
            reset: If `True`, the sums restart from zero after this read.
        """
        if not self.track_corrections:
            raise ValueError(
                "corrections() needs a layer built with "
                "`track_corrections=True`. Received: track_corrections=False"
            )
        if self.correction_sums is None:  # not built: no call yet
            sums = [0.0] * (len(_CORRECTION_KEYS) + 1)
        else:
            sums = [float(v) for v in ops.convert_to_numpy(self.correction_sums)]
        steps = sums[-1]
        result = {
            key: total / steps if steps else math.nan
            for key, total in zip(_CORRECTION_KEYS, sums)
        }
        result["steps"] = int(steps)
        if reset and self.correction_sums is not None:
            self.correction_sums.assign(
                ops.zeros(self.correction_sums.shape, "float32"))
        return result

    def call(self, inputs, training=None, mask=None):
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask must have one dimension less than the inputs. "
                f"Received: mask.shape={mask.shape}, "
                f"inputs.shape={inputs.shape}"
            )
        # Statistics in float32 at least, also under mixed precision.
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, dtype)
        gamma = ops.cast(self.gamma, dtype) if self.scale else 1.0
        beta = ops.cast(self.beta, dtype) if self.center else 0.0

        if training and self.trainable and 0 in inputs.shape:
            # An empty batch has no statistics (its mean would be 0 / 0, a
            # NaN in the moving statistics for good): the state is left as
            # it is, the call still counts, and the (empty) output stays
            # connected to gamma and beta.
            self.step.assign(self.step + 1)
            training = False
        grouped = training and self.trainable and self._splits_batch(x)
        synchronized = training and self.trainable and _synchronizing(self)
        fused = (
            training
            and self.trainable
            and self._fast_path
            and mask is None
            and not synchronized
            and self._fused_dtype_ok(dtype)
            and not _tensorflow_under_xla()
        )
        groups = 1
        if fused and grouped:
            # Whole groups of a batch of known size (None in a graph of any
            # batch size): the kernel per group and channel
            # (`_fused_training_call`); else the portable path.
            size = x.shape[0]
            fused = size is not None and size % self.virtual_batch_size == 0
            groups = size // self.virtual_batch_size if fused else 1
        if fused:
            outputs = _fused_training_call(self, x, gamma, beta, dtype, groups)
            return ops.cast(outputs, self.compute_dtype)
        if grouped:
            outputs = self._grouped_training_call(x, mask, gamma, beta, dtype)
            return ops.cast(outputs, self.compute_dtype)
        if training and self.trainable:
            if synchronized:
                batch_mean, batch_variance = _synchronized_moments(
                    self, x, mask)
            else:
                batch_mean, batch_variance = self._moments(x, mask)
            batch_stddev = ops.sqrt(batch_variance + self.epsilon)
            r, d = self._corrections(batch_mean, batch_stddev, dtype)
            # y = gamma * ((x - mu_B) / sigma_B * r + d) + beta = x * a + b.
            a = gamma * r / batch_stddev
            (b,) = self._once_per_channel(gamma * d + beta - batch_mean * a)
            self._update_state(batch_mean, batch_stddev)
        else:
            # y = gamma * (x - mu) / sigma + beta = x * a + b.
            a = gamma / ops.cast(self.moving_stddev, dtype)
            b = beta - ops.cast(self.moving_mean, dtype) * a
        outputs = x * self._broadcast(a, x) + self._broadcast(b, x)
        return ops.cast(outputs, self.compute_dtype)

    def _splits_batch(self, x):
        """Whether `virtual_batch_size` splits this batch into several
        groups (a batch of unknown size, in a TensorFlow graph, is split:
        the rule holds for any size)."""
        size = x.shape[0]
        return self.virtual_batch_size is not None and (
            size is None or size > self.virtual_batch_size)

    def _grouped_training_call(self, x, mask, gamma, beta, dtype):
        """Algorithm 1 on each group of `virtual_batch_size` consecutive
        examples, as if each group were one worker's minibatch.

        Each group `g` has its own `mu_g`, `sigma_g`, and its own `r_g`,
        `d_g` against the (shared) moving statistics; the moving statistics
        are then updated once, with the mean over groups of `mu_g` and of
        `sigma_g` (groups with no unmasked position left out). A batch of
        `N` examples that `V` does not divide ends with a smaller group of
        the last `N mod V`. The batch is padded to whole groups (padding
        left out of the statistics, its outputs dropped) and seen as
        `(groups, V, ...)`."""
        size = self.virtual_batch_size
        shape = ops.shape(x)
        n, rest = shape[0], tuple(shape[1:])
        padding = (-n) % size
        padded = not isinstance(padding, int) or padding > 0
        selected = _selection(mask)  # None: every position counts
        if padded:
            x = ops.concatenate([x, ops.zeros((padding,) + rest, x.dtype)])
            if selected is not None:
                selected = ops.concatenate([selected, ops.zeros(
                    (padding,) + tuple(ops.shape(selected)[1:]), "bool")])
            else:
                selected = ops.reshape(ops.arange(n + padding) < n,
                                       (-1,) + (1,) * len(rest))
        grouped = ops.reshape(x, (-1, size) + rest)
        if selected is not None:
            selected = ops.reshape(
                selected, (-1, size) + tuple(ops.shape(selected)[1:]))
        # In the grouped tensor: axis 0 the group, the channel axis moved
        # up by one; statistics over the others.
        channel = self.axis % len(x.shape) + 1
        axes = [i for i in range(1, len(x.shape) + 1) if i != channel]
        per_group = [1] * (len(x.shape) + 1)
        per_group[0], per_group[channel] = -1, ops.shape(x)[self.axis]

        def broadcast(values):
            return ops.reshape(values, per_group)

        mean, variance, positions = _selected_moments(grouped, selected, axes)
        mean, variance = ops.squeeze(mean, axes), ops.squeeze(variance, axes)
        weights = None  # of the groups: equal
        if selected is not None:
            # The mean over the groups that hold data; over all of them
            # where none does (as a wholly masked batch without groups).
            nonempty = ops.cast(ops.squeeze(positions, axes) > 0, dtype)
            total = ops.sum(nonempty, axis=0)
            weights = ops.where(
                total > 0, nonempty / ops.maximum(total, 1.0),
                1.0 / ops.cast(ops.shape(nonempty)[0], dtype))
        stddev = ops.sqrt(variance + self.epsilon)
        r, d = self._corrections(mean, stddev, dtype, weights)
        a = gamma * r / stddev
        (b,) = self._once_per_channel(gamma * d + beta - mean * a)
        outputs = grouped * broadcast(a) + broadcast(b)
        outputs = ops.reshape(outputs, (-1,) + rest)
        if padded:
            outputs = outputs[:n]
        if weights is None:
            self._update_state(mean, stddev)
        else:
            self._update_state(ops.sum(mean * weights, axis=0),
                               ops.sum(stddev * weights, axis=0))
        return outputs

    def _static_bounds(self):
        """`(r_max, d_max)` as Python floats where the schedule makes them
        constant (each `None` where it does not): then a training call spends
        no tensor arithmetic on the schedule."""
        fixed = self.warmup_steps == 0
        r_max = self.r_max if self.r_max == 1.0 or (
            fixed and self.r_max_steps == 0) else None
        d_max = self.d_max if self.d_max == 0.0 or (
            fixed and self.d_max_steps == 0) else None
        return r_max, d_max

    def _corrections(self, batch_mean, batch_stddev, dtype, weights=None):
        """`r` and `d` of Algorithm 1 at the current step, as constants for
        the gradient; with `track_corrections`, also added to the layer's
        sums (`_track_corrections`, the groups weighted by `weights`)."""
        moving_mean = ops.cast(self.moving_mean, dtype)
        moving_stddev = ops.cast(self.moving_stddev, dtype)
        r_max, d_max = self._static_bounds()
        if r_max is None or d_max is None:
            scheduled = self.bounds()
            r_max = ops.cast(scheduled[0], dtype) if r_max is None else r_max
            d_max = ops.cast(scheduled[1], dtype) if d_max is None else d_max
        ratio = batch_stddev / moving_stddev
        if isinstance(r_max, float):
            r = ops.clip(ratio, 1.0 / r_max, r_max)
        else:
            r = ops.minimum(ops.maximum(ratio, 1.0 / r_max), r_max)
        # Where the means agree, no correction: 0, also for a zero moving
        # stddev (0 / 0 would be NaN, which no clipping removes).
        difference = batch_mean - moving_mean
        d = ops.where(difference == 0.0, 0.0, difference / moving_stddev)
        if self.track_corrections:
            # Strictly outside the bounds: in the warm-up (r_max = 1,
            # d_max = 0), wherever a batch statistic differs from the
            # moving one at all.
            clipped = ((ratio < 1.0 / r_max) | (ratio > r_max),
                       ops.abs(d) > d_max)
        if isinstance(d_max, float):
            d = ops.clip(d, -d_max, d_max)
        else:
            d = ops.minimum(ops.maximum(d, -d_max), d_max)
        r, d = self._once_per_channel(r, d)
        r, d = ops.stop_gradient(r), ops.stop_gradient(d)
        if self.track_corrections:
            self._track_corrections(r, d, *clipped, weights)
        return r, d

    def _track_corrections(self, r, d, r_clipped, d_clipped, weights=None):
        """Adds this call's means of `|r - 1|`, `|d|` and the two clipping
        indicators, over channels and groups, to `correction_sums`, and 1 to
        its count, in float32. The arguments are per channel, or per group
        and channel with `weights` (per group and channel, summing to 1 over
        the groups) or else equal weights."""
        values = ops.stack([ops.abs(r - 1.0), ops.abs(d),
                            ops.cast(r_clipped, r.dtype),
                            ops.cast(d_clipped, r.dtype)])
        if weights is not None:
            values = ops.sum(values * weights, axis=1)
        means = ops.mean(ops.reshape(values, (len(_CORRECTION_KEYS), -1)), 1)
        self.correction_sums.assign(self.correction_sums + ops.concatenate(
            [ops.cast(means, "float32"), ops.ones((1,), "float32")]))

    def _once_per_channel(self, *values):
        """`values` exactly (each divided by 1), as the results of a
        division, with a 1 that a compiler cannot fold (computed from the
        step counter). XLA:CPU copies cheap per-channel arithmetic (the
        clipping of r and d, the bounds from the step, `gamma d + beta - mu_B
        a`) into every loop over `x` that reads its result, recomputing it
        for each element of each loop; it never copies a division."""
        one = ops.cast(self.step >= 0, values[0].dtype)
        return tuple(value / one for value in values)

    def _update_state(self, batch_mean, batch_stddev):
        """The moving averages' step towards the batch statistics: per
        channel, or per group and channel `(groups, channels)`, then towards
        their mean over the groups; and the counter's."""
        if len(batch_mean.shape) == 2:
            batch_mean = ops.mean(batch_mean, axis=0)
            batch_stddev = ops.mean(batch_stddev, axis=0)
        decay = 1.0 - self.momentum
        moving_mean = ops.cast(self.moving_mean, batch_mean.dtype)
        moving_stddev = ops.cast(self.moving_stddev, batch_mean.dtype)
        self.moving_mean.assign(moving_mean + decay * (batch_mean - moving_mean))
        self.moving_stddev.assign(
            moving_stddev + decay * (batch_stddev - moving_stddev)
        )
        self.step.assign(self.step + 1)

    def _broadcast(self, per_channel, x):
        """Reshapes a per-channel vector so that it broadcasts against `x`."""
        shape = [1] * len(x.shape)
        shape[self.axis] = -1
        return ops.reshape(per_channel, shape)

    def _moments(self, x, mask):
        """Per-channel batch mean and biased variance of `x`.

        Without a mask, in one read of `x` (the two reductions fuse with what
        produced `x`): `var = E[x^2] - E[x]^2`. That difference loses
        `log10(E[x^2] / var)` of float32's 7 significant digits to
        cancellation; where a channel would keep fewer than 4 (a large mean
        and a small spread, such as a nearly constant channel), the variance
        is computed again around the mean, `E[(x - mu_B)^2]`, in a second
        read (`ops.cond`: only one of the two runs). The gradient is the
        variance's, `2 (x - mu_B) / n`, taken through the one-read formula.
        Where one read does not pay (`_one_read_moments`: GPUs and other
        accelerators, CPUs with AVX-512), two reads: the mean, then
        `E[(x - mu_B)^2]`.
        """
        axes = self._reduction_axes
        one_read = self._one_read
        if one_read is None and mask is None:
            one_read = _one_read_moments(_device_type(x))
        if mask is None and not one_read:
            # Two reads, as Keras's BatchNormalization (jnp.var, tf.nn.moments)
            # does: exact around the mean, differentiated as it is.
            mean = ops.mean(x, axis=axes)
            centered = x - self._broadcast(mean, x)
            return mean, ops.mean(ops.square(centered), axis=axes)
        if mask is None:
            mean = ops.mean(x, axis=axes)
            # E[x^2] * 2^-64, as x * (x * 2^-64): exact (a power of two) and
            # finite up to |x| ~ 8e28, where x^2 overflows from 1.8e19.
            scaled_square = ops.mean(x * (x * _SQUARE_SCALE), axis=axes)
            mean_square = scaled_square / _SQUARE_SCALE
            variance = mean_square - ops.square(mean)
            # An E[x^2] beyond 2^126 (or NaN) takes the recomputation, tested
            # on the finite scaled value: E[x^2] - E[x]^2 would be inf - inf,
            # and XLA's CPU fast math does not keep NaN comparisons false.
            kept = (scaled_square <= _SQUARE_SCALED_MAX) & (
                mean_square <= _CANCELLATION_LIMIT * variance
            )
            if self.epsilon < _UNDERFLOW_EPSILON and x.dtype == "float32":
                kept = kept & (scaled_square >= _SQUARE_UNDERFLOW)
            kept = ops.all(kept)
            # The value only: a differentiated `cond` would carry a tensor of
            # the size of `x` from the forward to the backward pass.
            exact = ops.stop_gradient(
                ops.cond(
                    kept,
                    lambda: ops.maximum(variance, 0.0),
                    lambda: ops.mean(
                        ops.square(x - self._broadcast(mean, x)), axis=axes
                    ),
                )
            )
            # The gradient of E[x^2] - E[x]^2, 2 (x - mu_B) / n, carried by
            # terms whose value is exactly 0 while x is finite (`variance`
            # itself may be inf or NaN where E[x^2] overflowed).
            mean_constant = ops.stop_gradient(mean)
            carrier = (
                scaled_square - ops.stop_gradient(scaled_square)
            ) / _SQUARE_SCALE - 2.0 * mean_constant * (mean - mean_constant)
            return mean, exact + carrier
        mean, variance, _ = _selected_moments(x, _selection(mask), axes)
        return ops.squeeze(mean, axes), ops.squeeze(variance, axes)

    def get_config(self):
        base_config = super().get_config()
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(
                self.moving_mean_initializer
            ),
            "moving_stddev_initializer": initializers.serialize(
                self.moving_stddev_initializer
            ),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "r_max": self.r_max,
            "d_max": self.d_max,
            "warmup_steps": self.warmup_steps,
            "r_max_steps": self.r_max_steps,
            "d_max_steps": self.d_max_steps,
            "fused": self.fused,
            "virtual_batch_size": self.virtual_batch_size,
            "synchronized": self.synchronized,
            "track_corrections": self.track_corrections,
        }
        return {**base_config, **config}

    def _saved_variables(self):
        """The variables in saved files, in Keras's order (trainable, then
        non-trainable): all but `correction_sums`, per-session state, so a
        layer's files are the same with or without `track_corrections`."""
        return [
            v for v in self._trainable_variables + self._non_trainable_variables
            if v is not self.correction_sums
        ]

    def save_own_variables(self, store):
        for i, variable in enumerate(self._saved_variables()):
            store[f"{i}"] = variable

    def load_own_variables(self, store):
        if not self.track_corrections:
            return super().load_own_variables(store)
        variables = self._saved_variables()
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"Layer '{self.name}' expected {len(variables)} variables, "
                f"but received {len(store.keys())} variables during loading. "
                f"Expected: {[v.name for v in variables]}"
            )
        for i, variable in enumerate(variables):
            variable.assign(store[f"{i}"])


# ------------------------- TensorFlow's distribution strategies: synchronized
def _replica_context():
    """The tf.distribute replica context when one with several replicas is
    active (inside a MirroredStrategy's step), else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def _synchronizing(layer):
    """Whether this training call takes its moments over all replicas."""
    return layer.synchronized and _replica_context() is not None


def _synchronized_moments(layer, x, mask):
    """The mean and biased variance over the global batch, every replica's
    examples together, as `synchronized=True` in BatchNormalization: sums
    all-reduced across the replicas, the variance around the global mean in
    a second round (exact where `E[x^2] - E[x]^2` would cancel). The
    all-reduces are differentiable, so the gradient is Algorithm 1's over
    the global batch."""
    import tensorflow as tf

    context = _replica_context()
    axes = layer._reduction_axes
    mean, variance, _ = _selected_moments(
        x, _selection(mask), axes,
        all_reduce=lambda values: context.all_reduce(
            tf.distribute.ReduceOp.SUM, values))
    return ops.squeeze(mean, axes), ops.squeeze(variance, axes)


def _selection(mask):
    """A Keras mask (examples, positions) as a selection that broadcasts
    against the input's channel axis; None for no mask."""
    if mask is None:
        return None
    return ops.expand_dims(ops.cast(mask, "bool"), axis=-1)


def _selected_moments(x, selected, axes, all_reduce=None):
    """The mean and biased variance of `x` over `axes` (kept, of size 1),
    around the mean, and the number of positions, counting the positions
    where `selected` (boolean, broadcast against `x`) holds; `None`: all of
    them, and no count without `all_reduce`. `all_reduce` sums a list of
    tensors across replicas: the moments of the global batch, the variance
    in a second round. Positions left out enter the sums as zeros, chosen
    (not multiplied by 0: a NaN or inf there would make 0 * x NaN); none
    selected gives 0 and 0."""
    if selected is None and all_reduce is None:
        mean = ops.mean(x, axis=axes, keepdims=True)
        return mean, ops.mean(ops.square(x - mean), axes, keepdims=True), None
    reduce = all_reduce or (lambda values: values)
    if selected is None:  # no selection pass over x
        sums = ops.sum(x, axes, keepdims=True)
        count = ops.cast(ops.size(x) // ops.size(sums), x.dtype)
        count = ops.broadcast_to(count, ops.shape(sums))
    else:
        selected = ops.broadcast_to(selected, ops.shape(x))
        count = ops.sum(ops.cast(selected, x.dtype), axes, keepdims=True)
        sums = ops.sum(ops.where(selected, x, 0.0), axes, keepdims=True)
    count, sums = reduce([count, sums])
    mean = sums / ops.maximum(count, 1.0)
    squares = ops.square(x - mean)
    if selected is not None:
        squares = ops.where(selected, squares, 0.0)
    (squares,) = reduce([ops.sum(squares, axes, keepdims=True)])
    return mean, squares / ops.maximum(count, 1.0), count


# ------------- the device a call computes on (each framework's own API)
def cpu_has_avx512(cpuinfo="/proc/cpuinfo"):
    """Whether the host CPU reports AVX-512 (Linux's `cpuinfo`), or None
    where that cannot be read: each caller says what an unknown CPU gets."""
    try:
        with open(cpuinfo) as file:
            flags = [line.split() for line in file if line.startswith("flags")]
    except OSError:
        return None
    return any("avx512f" in words for words in flags)


@functools.cache
def _one_read_moments(device_type, cpuinfo="/proc/cpuinfo"):
    """Whether the portable path computes the statistics in one read
    (`E[x]`, `E[x^2]`, recomputed where they cancel) rather than two (the
    mean, then the mean squared deviation) on a device of `device_type`
    (`_device_type`). Two reads, as Keras's BatchNormalization, on anything
    but a CPU, where one read was never measured to pay. On a CPU, one read
    is faster with AVX2 only (XLA's CPU reductions there), two reads with
    AVX-512 (docs/speed.md); an unknown CPU gets one read."""
    return device_type == "cpu" and cpu_has_avx512(cpuinfo) is not True


@functools.cache
def _default_accelerator(backend):
    """The type of the accelerator ("gpu", "tpu") that TensorFlow or JAX
    places computations on by default, or "cpu" where there is none."""
    if backend == "jax":
        import jax

        return jax.default_backend()
    if backend == "tensorflow":
        import tensorflow as tf

        types = [d.device_type.lower() for d in tf.config.list_logical_devices()]
        return next((t for t in types if t != "cpu"), "cpu")
    return "cpu"


def _device_type(x=None):
    """The type of device ("cpu", "gpu", "tpu", ...) that a call on the
    tensor `x` computes on: on PyTorch, `x`'s device (without `x`, Keras's
    default device, where it puts new tensors); on TensorFlow and JAX, where
    they place computations by default: their accelerator if they have one.
    Read while tracing, so a compiled step holds no trace of it."""
    backend = keras.backend.backend()
    if backend == "torch":
        device = (ops.convert_to_tensor(0.0) if x is None else x).device.type
        return "gpu" if device == "cuda" else device
    return _default_accelerator(backend)


# --------------------------------- fast path: TensorFlow's and PyTorch's kernels
# Backends with a fused batch norm kernel that the layer uses in training.
_FAST_PATH_BACKENDS = ("tensorflow", "torch")


def has_fast_path():
    """Whether the current Keras backend has a fused kernel that
    `BatchRenormalization` uses in training: TensorFlow's fused batch norm,
    PyTorch's batch_norm.

    On JAX the layer's `keras.ops` path is the fast one: XLA fuses it."""
    return keras.backend.backend() in _FAST_PATH_BACKENDS


def _fused_training_call(layer, x, gamma, beta, dtype, groups=1):
    """Algorithm 1's training call on NHWC `x` with the backend's fused batch
    norm kernel; the same numbers as the portable path, up to rounding.

    The kernels normalize with the batch statistics and differentiate through
    them in one fused forward and one fused backward, in place of the
    portable path's several reductions and elementwise ops and their
    gradients. `r` and `d` are constants for the gradient, so they enter as
    the kernel's scale and offset, or as an affine map of its output.

    With `groups > 1` (virtual batches of `N / groups`) the tensor is copied
    so that each (group, channel) is one channel of the kernel: the copy and
    the kernel cost less than the portable path's per-group reductions
    (docs/speed.md). Statistics come back
    as `(groups, channels)`; the moving statistics move towards their mean
    over groups.
    """
    if keras.backend.backend() == "torch":
        return _torch_training_call(layer, x, gamma, beta, dtype, groups)
    return _tf_training_call(layer, x, gamma, beta, dtype, groups)


def _tensorflow_under_xla():
    """Whether TensorFlow is tracing for XLA (`jit_compile=True`). XLA lowers
    the fused kernels into its own ops, and there the portable path, which
    it fuses, is the faster (docs/speed.md)."""
    if keras.backend.backend() != "tensorflow":
        return False
    try:
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util
    except ImportError:
        return False
    graph = tf.compat.v1.get_default_graph()
    return bool(control_flow_util.GraphOrParentsInXlaContext(graph))


def _tf_training_call(layer, x, gamma, beta, dtype, groups=1):
    """TensorFlow: `x_hat` and the statistics from one FusedBatchNormV3, then
    `y = x_hat * (gamma * r) + (gamma * d + beta)`, whose gradient is one
    FusedBatchNormGradV3 with scale `gamma * r` (see `_tf_affine_of_fused`).
    Groups: the kernel on `(V, H, W, groups * C)`."""
    import tensorflow as tf

    shape = x.shape
    if groups > 1:
        n, h, w, c = shape
        x = tf.reshape(tf.transpose(tf.reshape(
            x, (groups, n // groups, h, w, c)), (1, 2, 3, 0, 4)),
            (n // groups, h, w, groups * c))
    channels = x.shape[-1]
    x_hat, batch_mean, variance, *reserve = tf.raw_ops.FusedBatchNormV3(
        x=x,
        scale=tf.ones([channels], x.dtype),
        offset=tf.zeros([channels], x.dtype),
        mean=tf.constant([], x.dtype),
        variance=tf.constant([], x.dtype),
        epsilon=layer.epsilon,
        data_format="NHWC",
        is_training=True,
    )
    # In training the kernel returns the variance with Bessel's correction,
    # n / (n - 1), for running averages; Algorithm 1 wants the biased one.
    n = tf.cast(tf.size(x, out_type=tf.int64) // channels, x.dtype)
    variance = tf.where(n > 1, variance * (n - 1) / tf.maximum(n, 1), 0.0)
    batch_mean = tf.stop_gradient(batch_mean)
    batch_stddev = tf.sqrt(tf.stop_gradient(variance) + layer.epsilon)
    if groups > 1:  # statistics per (group, channel)
        batch_mean = tf.reshape(batch_mean, (groups, -1))
        batch_stddev = tf.reshape(batch_stddev, (groups, -1))
    r, d = layer._corrections(batch_mean, batch_stddev, dtype)
    layer._update_state(batch_mean, batch_stddev)
    outputs = _tf_affine_of_fused(
        x, tf.stop_gradient(x_hat), tf.reshape(gamma * r, [-1]),
        tf.reshape(gamma * d + beta, [-1]),
        *[tf.stop_gradient(t) for t in reserve], epsilon=layer.epsilon)
    if groups == 1:
        return outputs
    n, h, w, c = shape
    return tf.reshape(tf.transpose(tf.reshape(
        outputs, (n // groups, h, w, groups, c)), (3, 0, 1, 2, 4)), shape)


def _tf_affine_of_fused(x, x_hat, scale, offset, *reserve, epsilon):
    """`x_hat * scale + offset` for the `x_hat` that FusedBatchNormV3 made of
    `x` (its reserve spaces given), differentiated as one fused batch norm
    with this scale and offset: one FusedBatchNormGradV3 gives the gradients
    for `x`, `scale` and `offset`, where automatic differentiation of the
    kernel and then of the affine map takes three more passes over the
    tensor. `scale` and `offset` hold `r` and `d`, constants for the
    gradient, so this is Algorithm 1's gradient exactly."""
    import tensorflow as tf

    @tf.custom_gradient
    def affine(x, scale, offset):
        def gradient(dy):
            dx, dscale, doffset, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy,
                x=x,
                scale=scale,
                reserve_space_1=reserve[0],
                reserve_space_2=reserve[1],
                reserve_space_3=reserve[2],
                epsilon=epsilon,
                data_format="NHWC",
                is_training=True,
            )
            return dx, dscale, doffset

        return x_hat * scale + offset, gradient

    return affine(x, scale, offset)


def _torch_training_call(layer, x, gamma, beta, dtype, groups=1):
    """PyTorch: `x_hat` and the statistics from one `native_batch_norm` in
    training mode, on the channels-last tensor seen as NCHW (no copy), then
    `y = x_hat * (gamma * r) + (gamma * d + beta)` in place, differentiated
    as one batch norm with that scale and offset (`_torch_affine_of_fused`).
    The kernel's statistics feed `r`, `d` and the moving averages: no
    separate statistics pass.
    Groups: the kernel on a copy shaped `(V, groups * C, H, W)`."""
    import torch

    shape = x.shape
    if groups > 1:
        n, h, w, c = shape
        x = x.reshape(groups, n // groups, h, w, c).permute(1, 0, 4, 2, 3)
        x = x.reshape(n // groups, groups * c, h, w)  # a copy
    else:
        x = x.permute(0, 3, 1, 2)
    with torch.no_grad():
        # native_batch_norm, not functional.batch_norm: that one refuses
        # batches with a single value per channel, which Algorithm 1 allows.
        x_hat, batch_mean, inverse_stddev = torch.native_batch_norm(
            x, None, None, None, None, True, 0.0, layer.epsilon
        )
        batch_stddev = 1.0 / inverse_stddev
        if groups > 1:
            r, d = _torch_corrections_and_update(
                layer, batch_mean.reshape(groups, -1),
                batch_stddev.reshape(groups, -1))
        else:
            r, d = _torch_corrections_and_update(layer, batch_mean,
                                                 batch_stddev)
    outputs = _torch_affine_of_fused().apply(
        x, x_hat, (gamma * r).reshape(-1), (gamma * d + beta).reshape(-1),
        batch_mean, inverse_stddev, layer.epsilon,
    )
    if groups == 1:
        return outputs.permute(0, 2, 3, 1)
    n, h, w, c = shape
    return outputs.reshape(n // groups, groups, c, h, w).permute(
        1, 0, 3, 4, 2).reshape(shape)


def _torch_corrections_and_update(layer, batch_mean, batch_stddev):
    """`layer._corrections` and `layer._update_state` in torch ops (under
    no_grad; statistics `(channels,)`, or `(groups, channels)` with the
    update towards their mean over groups): the same arithmetic without
    the per-call overhead of keras.ops, which shows on small batches."""
    import torch

    moving_mean = layer.moving_mean.value.to(batch_mean.dtype)
    moving_stddev = layer.moving_stddev.value.to(batch_mean.dtype)
    step = layer.step.value
    r_max, d_max = layer._static_bounds()
    if r_max is None or d_max is None:
        scheduled = renorm_bounds(
            step.to(torch.float32), layer.r_max, layer.d_max,
            layer.warmup_steps, layer.r_max_steps, layer.d_max_steps,
            clip=torch.clamp)
        if r_max is None:
            r_max = scheduled[0].to(batch_mean.dtype)
        if d_max is None:
            d_max = scheduled[1].to(batch_mean.dtype)
    r = batch_stddev / moving_stddev
    if layer.track_corrections:  # before the clipping below, in place
        r_clipped = (r < 1.0 / r_max) | (r > r_max)
    if isinstance(r_max, float):
        r = r.clamp_(1.0 / r_max, r_max)
    else:
        r = torch.minimum(torch.maximum(r, r_max.reciprocal()), r_max)
    difference = batch_mean - moving_mean
    # Where the means agree, no correction (see `_corrections`).
    d = torch.where(difference == 0, 0.0, difference / moving_stddev)
    if layer.track_corrections:
        d_clipped = d.abs() > d_max
    if isinstance(d_max, float):
        d = d.clamp_(-d_max, d_max)
    else:
        d = torch.minimum(torch.maximum(d, -d_max), d_max)
    if layer.track_corrections:
        # `layer._track_corrections` in torch ops (no mask here: the groups
        # weigh the same).
        means = torch.stack([(r - 1.0).abs(), d.abs(), r_clipped.to(r.dtype),
                             d_clipped.to(r.dtype)]).reshape(4, -1).mean(1)
        layer.correction_sums.assign(layer.correction_sums.value + torch.cat(
            [means.float(), means.new_ones(1, dtype=torch.float32)]))
    decay = 1.0 - layer.momentum
    if batch_mean.ndim == 2:  # groups
        difference = difference.mean(0)
        batch_stddev = batch_stddev.mean(0)
    layer.moving_mean.assign(moving_mean + decay * difference)
    layer.moving_stddev.assign(
        moving_stddev + decay * (batch_stddev - moving_stddev))
    layer.step.assign(step + 1)
    return r, d


_TORCH_AFFINE_OF_FUSED = []


def _torch_affine_of_fused():
    """The autograd function `x_hat * scale + offset` of `x`, `scale` and
    `offset`, for the `x_hat` that native_batch_norm made of NCHW `x`; its
    backward is one `native_batch_norm_backward` with this scale, whose
    outputs are the gradients for all three, where autograd of the affine
    map takes three more passes over the tensor. `scale` and `offset` hold
    `r` and `d`, constants for the gradient, so this is Algorithm 1's
    gradient exactly. (Built on first use: torch is imported lazily.)"""
    if _TORCH_AFFINE_OF_FUSED:
        return _TORCH_AFFINE_OF_FUSED[0]
    import torch

    class AffineOfFused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, x_hat, scale, offset, mean, inverse_stddev,
                    epsilon):
            ctx.save_for_backward(x, scale, mean, inverse_stddev)
            ctx.epsilon = epsilon
            # In place: x_hat is not needed afterwards.
            ctx.mark_dirty(x_hat)
            return x_hat.mul_(scale[:, None, None]).add_(
                offset[:, None, None])

        @staticmethod
        def backward(ctx, dy):
            x, scale, mean, inverse_stddev = ctx.saved_tensors
            needed = list(ctx.needs_input_grad)
            dx, dscale, doffset = torch.ops.aten.native_batch_norm_backward(
                dy, x, scale, None, None, mean, inverse_stddev, True,
                ctx.epsilon, [needed[0], needed[2], needed[3]])
            return dx, None, dscale, doffset, None, None, None

    _TORCH_AFFINE_OF_FUSED.append(AffineOfFused)
    return AffineOfFused


# Arguments of BatchNormalization's config that carry over unchanged.
_SHARED_CONFIG_KEYS = (
    "name",
    "trainable",
    "dtype",
    "axis",
    "momentum",
    "epsilon",
    "center",
    "scale",
    "beta_initializer",
    "gamma_initializer",
    "moving_mean_initializer",
    "beta_regularizer",
    "gamma_regularizer",
    "beta_constraint",
    "gamma_constraint",
)


def convert_to_renorm(model, **renorm_kwargs):
    """Copies a model, replacing every BatchNormalization by BatchRenormalization.

    Works on Sequential and Functional models (nested ones included). Each new
    layer keeps the old one's `gamma`, `beta` and moving mean, and gets
    `moving_stddev = sqrt(moving_variance + epsilon)`, so inference outputs
    are the same before and after. Every other layer is cloned with its
    weights. The original model is left untouched.

    Args:
        model: A Sequential or Functional Keras model.
        **renorm_kwargs: `BatchRenormalization` arguments for the new layers
            (e.g. `r_max`, `d_max`, `warmup_steps`, `r_max_steps`,
            `d_max_steps`, `momentum`); they override the copied ones.

    Returns:
        A new model with its own weights.
    """
    if not isinstance(model, (keras.Sequential, keras.Model)):
        raise ValueError(
            f"convert_to_renorm expects a Keras model. Received: {model!r}"
        )
    pairs = []

    def clone(layer):
        if type(layer) is keras.layers.BatchNormalization:
            config = layer.get_config()
            kwargs = {k: config[k] for k in _SHARED_CONFIG_KEYS if k in config}
            kwargs.update(renorm_kwargs)
            new_layer = BatchRenormalization(**kwargs)
        else:
            new_layer = layer.__class__.from_config(layer.get_config())
        pairs.append((layer, new_layer))
        return new_layer

    new_model = keras.models.clone_model(
        model, clone_function=clone, recursive=True
    )
    # Copies of the values (NumPy), not the variables: on JAX, assigning a
    # variable shares its buffer, which a compiled step of the new model
    # donates, deleting the original model's weights.
    for old, new in pairs:
        if isinstance(new, BatchRenormalization):
            if new.scale:
                new.gamma.assign(ops.convert_to_numpy(old.gamma))
            if new.center:
                new.beta.assign(ops.convert_to_numpy(old.beta))
            new.moving_mean.assign(ops.convert_to_numpy(old.moving_mean))
            new.moving_stddev.assign(
                ops.sqrt(ops.convert_to_tensor(old.moving_variance) + old.epsilon)
            )
        else:
            new.set_weights(old.get_weights())
    return new_model
