"""An independent float64 NumPy reference of Batch Renormalization.

Algorithm 1 of Ioffe (2017), "Batch Renormalization: Towards Reducing
Minibatch Dependence in Batch-Normalized Models" (arXiv:1702.03275), with the
paper's warm-up and linear relaxation of `r_max` and `d_max`, and the analytic
backward pass. Written from the paper and the project's contract only; it
imports nothing from Keras or from `batch_renorm`.

Per channel, in training, with `mu`, `sigma` the moving mean and moving
standard deviation:

    mu_B = mean(x), sigma_B = sqrt(var(x) + epsilon)     (biased variance)
    r = clip(sigma_B / sigma, 1 / r_max, r_max)          (no gradient)
    d = clip((mu_B - mu) / sigma, -d_max, d_max)         (no gradient)
    x_hat = (x - mu_B) / sigma_B
    y = gamma * (x_hat * r + d) + beta
    mu <- mu + (1 - momentum) * (mu_B - mu)
    sigma <- sigma + (1 - momentum) * (sigma_B - sigma)
    step <- step + 1

Backward (r and d constant), with `g_y = dL/dy` and `N` the number of
positions averaged over:

    g_xhat = g_y * gamma * r
    dL/dx = (g_xhat - mean(g_xhat) - x_hat * mean(g_xhat * x_hat)) / sigma_B
    dL/dgamma = sum(g_y * (x_hat * r + d)),  dL/dbeta = sum(g_y)

(`d x_hat_j / d x_i = (delta_ij - 1/N - x_hat_i x_hat_j / N) / sigma_B`,
which holds with `epsilon` inside `sigma_B`.)

Inference: `y = gamma * (x - mu) / sigma + beta`.
"""

import numpy as np


def schedule_fraction(step, warmup_steps, ramp_end):
    """`t(k)`: 0 during warm-up, then linear up to 1 at `ramp_end`."""
    if step < warmup_steps:
        return 0.0
    if ramp_end <= warmup_steps:
        return 1.0
    return min(1.0, (step - warmup_steps) / (ramp_end - warmup_steps))


def schedule_bounds(step, r_max, d_max, warmup_steps, r_max_steps, d_max_steps):
    """`(r_max(k), d_max(k))` used by the training call made at step `k`."""
    t_r = schedule_fraction(step, warmup_steps, r_max_steps)
    t_d = schedule_fraction(step, warmup_steps, d_max_steps)
    return 1.0 + (r_max - 1.0) * t_r, d_max * t_d


def _per_channel_shape(ndim, axis):
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return shape


def _reduction_axes(ndim, axis):
    axis = axis % ndim
    return tuple(i for i in range(ndim) if i != axis)


class RenormReference:
    """Float64 state machine of one Batch Renormalization layer.

    `gamma=None` means `scale=False` (gamma = 1, no gamma gradient) and
    `beta=None` means `center=False`.
    """

    def __init__(
        self,
        channels,
        *,
        axis=-1,
        gamma=None,
        beta=None,
        moving_mean=None,
        moving_stddev=None,
        momentum=0.99,
        epsilon=1e-3,
        r_max=3.0,
        d_max=5.0,
        warmup_steps=5000,
        r_max_steps=40000,
        d_max_steps=25000,
        step=0,
    ):
        def vector(value, default):
            if value is None:
                return np.full(channels, default, np.float64)
            return np.array(value, np.float64).reshape(channels)

        self.axis = axis
        self.scale = gamma is not None
        self.center = beta is not None
        self.gamma = vector(gamma, 1.0)
        self.beta = vector(beta, 0.0)
        self.moving_mean = vector(moving_mean, 0.0)
        self.moving_stddev = vector(moving_stddev, 1.0)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps
        self.r_max_steps = r_max_steps
        self.d_max_steps = d_max_steps
        self.step = int(step)

    def bounds(self, step=None):
        return schedule_bounds(
            self.step if step is None else step,
            self.r_max,
            self.d_max,
            self.warmup_steps,
            self.r_max_steps,
            self.d_max_steps,
        )

    def infer(self, x):
        x = np.asarray(x, np.float64)
        shape = _per_channel_shape(x.ndim, self.axis)
        return (
            self.gamma.reshape(shape)
            * (x - self.moving_mean.reshape(shape))
            / self.moving_stddev.reshape(shape)
            + self.beta.reshape(shape)
        )

    def train(self, x, g_y=None, mask=None):
        """One training step on `x`; updates the state and returns a dict.

        The dict holds `y`, the statistics (`mean`, `stddev`), `r`, `d`, the
        bounds used (`r_max`, `d_max`), and, when `g_y = dL/dy` is given,
        `dx`, `dgamma` and `dbeta`. `mask` (shape of `x` without the channel
        axis, which must be the last one) selects the positions the statistics
        are computed over; the backward pass is only supported without it.
        """
        x = np.asarray(x, np.float64)
        ndim = x.ndim
        shape = _per_channel_shape(ndim, self.axis)
        axes = _reduction_axes(ndim, self.axis)

        if mask is None:
            weights = np.ones_like(x)
        else:
            if g_y is not None:
                raise NotImplementedError("backward pass with a mask")
            if self.axis % ndim != ndim - 1:
                raise NotImplementedError("mask with a non-last channel axis")
            weights = np.broadcast_to(
                np.asarray(mask, np.float64)[..., None], x.shape
            )
        count = weights.sum(axis=axes)
        mean = (x * weights).sum(axis=axes) / count
        centered = x - mean.reshape(shape)
        variance = (centered**2 * weights).sum(axis=axes) / count
        stddev = np.sqrt(variance + self.epsilon)

        r_max, d_max = self.bounds()
        r = np.clip(stddev / self.moving_stddev, 1.0 / r_max, r_max)
        d = np.clip(
            (mean - self.moving_mean) / self.moving_stddev, -d_max, d_max
        )

        x_hat = centered / stddev.reshape(shape)
        normalized = x_hat * r.reshape(shape) + d.reshape(shape)
        y = self.gamma.reshape(shape) * normalized + self.beta.reshape(shape)
        out = {
            "y": y,
            "mean": mean,
            "stddev": stddev,
            "r": r,
            "d": d,
            "r_unclipped": stddev / self.moving_stddev,
            "d_unclipped": (mean - self.moving_mean) / self.moving_stddev,
            "r_max": r_max,
            "d_max": d_max,
        }

        if g_y is not None:
            g_y = np.asarray(g_y, np.float64)
            g_xhat = g_y * (self.gamma * r).reshape(shape)
            mean_g = g_xhat.mean(axis=axes, keepdims=True)
            mean_gx = (g_xhat * x_hat).mean(axis=axes, keepdims=True)
            out["dx"] = (g_xhat - mean_g - x_hat * mean_gx) / stddev.reshape(
                shape
            )
            out["dgamma"] = (g_y * normalized).sum(axis=axes)
            out["dbeta"] = g_y.sum(axis=axes)

        decay = 1.0 - self.momentum
        self.moving_mean = self.moving_mean + decay * (mean - self.moving_mean)
        self.moving_stddev = self.moving_stddev + decay * (
            stddev - self.moving_stddev
        )
        self.step += 1
        return out

    def train_groups(self, x, group_size, g_y=None, mask=None):
        """One training step with virtual batches: Algorithm 1 on each group
        of `group_size` consecutive examples (the last one smaller where the
        size does not divide), every group against the same moving
        statistics, as if each were one worker's minibatch; then the moving
        statistics move once, towards the mean over groups of the group
        means and of the group stddevs (groups wholly masked left out).
        Returns the dict of `train` with `y` (and `dx`) joined back in order,
        `dgamma`, `dbeta` summed over groups, the per-group `mean`,
        `stddev`, `r`, `d`, `r_unclipped`, `d_unclipped` stacked, the bounds
        `r_max`, `d_max`, and `held`: which groups hold unmasked data."""
        x = np.asarray(x, np.float64)
        starts = range(0, len(x), group_size)
        parts = []
        for start in starts:
            part = slice(start, start + group_size)
            group = self.copy()  # the step's state, for every group
            parts.append(group.train(
                x[part], None if g_y is None else np.asarray(g_y)[part],
                None if mask is None else np.asarray(mask)[part]))
        out = {key: np.stack([p[key] for p in parts])
               for key in ("mean", "stddev", "r", "d", "r_unclipped",
                           "d_unclipped")}
        out["r_max"], out["d_max"] = parts[0]["r_max"], parts[0]["d_max"]
        out["y"] = np.concatenate([p["y"] for p in parts])
        if g_y is not None:
            out["dx"] = np.concatenate([p["dx"] for p in parts])
            out["dgamma"] = sum(p["dgamma"] for p in parts)
            out["dbeta"] = sum(p["dbeta"] for p in parts)
        if mask is None:
            held = np.ones(len(parts), bool)
        else:
            held = np.array([np.asarray(mask)[s:s + group_size].any()
                             for s in starts])
        out["held"] = held
        decay = 1.0 - self.momentum
        self.moving_mean = self.moving_mean + decay * (
            out["mean"][held].mean(axis=0) - self.moving_mean)
        self.moving_stddev = self.moving_stddev + decay * (
            out["stddev"][held].mean(axis=0) - self.moving_stddev)
        self.step += 1
        return out

    def copy(self):
        new = RenormReference.__new__(RenormReference)
        new.__dict__.update(
            {
                k: (v.copy() if isinstance(v, np.ndarray) else v)
                for k, v in self.__dict__.items()
            }
        )
        return new


def correction_statistics(out):
    """What one training step contributes to the layer's `corrections()`:
    the means over channels, and over groups (the dict of `train_groups`:
    those in `held`, or all where none is), of `|r - 1|`, `|d|` (after
    clipping), and of whether the unclipped `sigma_B / sigma` lies strictly
    outside `[1 / r_max, r_max]` and the unclipped `|mu_B - mu| / sigma`
    strictly exceeds `d_max`; `out` is the dict of `train` or
    `train_groups`."""
    ratio, deviation = out["r_unclipped"], out["d_unclipped"]
    values = {
        "r_dev": np.abs(out["r"] - 1.0),
        "d_dev": np.abs(out["d"]),
        "r_clipped": (ratio < 1.0 / out["r_max"]) | (ratio > out["r_max"]),
        "d_clipped": np.abs(deviation) > out["d_max"],
    }
    held = out.get("held")
    if held is not None and held.any():
        values = {key: value[held] for key, value in values.items()}
    return {key: float(np.mean(value)) for key, value in values.items()}


def numeric_gradients(ref, x, g_y, h=1e-6):
    """Central finite differences of `sum(g_y * y)` w.r.t. x, gamma, beta.

    Uses the reference forward pass only, holding `r` and `d` at the values of
    the unperturbed step (they carry no gradient), on copies of `ref` so its
    state is not changed.
    """
    x = np.asarray(x, np.float64)
    g_y = np.asarray(g_y, np.float64)
    base = ref.copy().train(x)
    r, d = base["r"], base["d"]

    def loss(x_, gamma, beta):
        # The forward pass of `train`, with r and d held fixed.
        shape = _per_channel_shape(x_.ndim, ref.axis)
        axes = _reduction_axes(x_.ndim, ref.axis)
        mean = x_.mean(axis=axes)
        stddev = np.sqrt(x_.var(axis=axes) + ref.epsilon)
        x_hat = (x_ - mean.reshape(shape)) / stddev.reshape(shape)
        y = gamma.reshape(shape) * (
            x_hat * r.reshape(shape) + d.reshape(shape)
        ) + beta.reshape(shape)
        return float((g_y * y).sum())

    def grad(f, value):
        g = np.zeros_like(value)
        flat, gflat = value.reshape(-1), g.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + h
            up = f(value)
            flat[i] = old - h
            down = f(value)
            flat[i] = old
            gflat[i] = (up - down) / (2 * h)
        return g

    gamma, beta = ref.gamma.copy(), ref.beta.copy()
    return {
        "dx": grad(lambda v: loss(v, gamma, beta), x.copy()),
        "dgamma": grad(lambda v: loss(x, v, beta), gamma.copy()),
        "dbeta": grad(lambda v: loss(x, gamma, v), beta.copy()),
    }
