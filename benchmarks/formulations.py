#!/usr/bin/env python3
"""Profile before optimizing: forward + backward of one training-mode
normalization on (B, 32, 32, C), written directly in the framework (no Keras),
in the formulations that BatchRenormalization could use.

  python benchmarks/formulations.py tensorflow [--channels 128] [--repeats 7]
  python benchmarks/formulations.py torch
  python benchmarks/formulations.py jax

TensorFlow (tf.function, no XLA):
  keras-bn      what Keras's BatchNormalization runs: tf.nn.moments, then
                tf.nn.batch_normalization
  portable      BatchRenormalization's keras.ops path: two-pass moments,
                r and d, y = x * a + b
  fused-bn      tf.compat.v1.nn.fused_batch_norm with gamma, beta (plain BN,
                the lower bound)
  fused-affine  the fused kernel for x_hat and the statistics, then
                y = x_hat * (gamma r) + (gamma d + beta), differentiated
                automatically (the first fast path)
  fused-grad    the same forward, with a custom gradient: one
                FusedBatchNormGradV3 with scale gamma r gives the gradients
                of x, gamma r and gamma d + beta (the fast path)
  moments-fused tf.nn.moments first (no gradient) for r and d, then the fused
                kernel with scale gamma r and offset gamma d + beta
PyTorch:
  keras-bn      what Keras's BatchNormalization runs on torch: E[x^2] - E[x]^2,
                then (x - mean) * a + offset
  portable      as above
  native-bn     torch.batch_norm with gamma, beta (plain BN, the lower bound)
  native-affine torch.native_batch_norm for x_hat, then the affine map
  varmean-native torch.var_mean first (no gradient) for r and d, then
                torch.batch_norm with scale gamma r, offset gamma d + beta
                (the fast path until attempt 9)
  native-grad   native_batch_norm for x_hat and the statistics, the affine
                map in place, and one native_batch_norm_backward with scale
                gamma r as its gradient (the fast path since attempt 9)

JAX (jax.jit, XLA):
  keras-bn      what Keras's BatchNormalization runs on JAX: jnp.mean, jnp.var,
                then x * inv + (beta - mean * inv)
  portable      as above
  one-pass      the statistics in one read of x: E[x - s] and E[(x - s)^2]
                with a shift s taken from the batch (no gradient), so no
                cancellation, then as portable (the first portable path)
  one-read      E[x] and E[x^2] straight from x, var = E[x^2] - E[x]^2,
                recomputed around the mean only where that cancels (a
                lax.cond, outside differentiation), then as portable (the
                portable path)

With --groups V (virtual_batch_size=V: Algorithm 1 per group of V
consecutive examples), TensorFlow and PyTorch:
  portable      BatchRenormalization's keras.ops path with groups: the batch
                seen as (N / V, V, ...), per-group moments, r and d
  whole-batch   the ungrouped portable path (what groups add)
  fused-transposed / native-transposed
                the fused kernel per group and channel: the tensor copied
                into (V, H, W, G * C) (TF, NHWC) or (V, G * C, H, W)
                (torch), the kernel with G * C channels, the output copied
                back (the only way to the kernels: they normalize per
                channel over the whole batch)
  native-grad-transposed  torch: the same copy, then the fast path's
                native_batch_norm + one native_batch_norm_backward

Prints the median ms per step of each, interleaved, and the largest
difference of each formulation's gradients from the portable path's.
"""

import argparse
import statistics
import time

import numpy as np

EPS = 1e-3


def tf_step(formula, x, dy, gamma, beta):
    """One forward + backward of `sum(formula(x) * dy)` (a tf.function, no
    XLA), returning the gradients of x, gamma, beta as NumPy."""
    import tensorflow as tf

    @tf.function(jit_compile=False)
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(formula(x) * dy)
        return tape.gradient(loss, [x, gamma, beta])

    return lambda: [g.numpy() for g in step()]


def torch_step(formula, x, dy, gamma, beta):
    """The same for PyTorch (eager autograd)."""
    def step():
        for tensor in (x, gamma, beta):
            tensor.grad = None
        (formula(x) * dy).sum().backward()
        return [t.grad.numpy().copy() for t in (x, gamma, beta)]

    return step


def tf_affine_of_fused(x, x_hat, scale, offset, reserve):
    """The fast path's affine map of FusedBatchNormV3's `x_hat` (of `x`),
    its gradient one FusedBatchNormGradV3 with that scale."""
    import tensorflow as tf

    x_hat = tf.stop_gradient(x_hat)
    reserve = [tf.stop_gradient(t) for t in reserve]

    @tf.custom_gradient
    def affine(x, scale, offset):
        def gradient(dy):
            dx, dscale, doffset, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy, x=x, scale=scale,
                reserve_space_1=reserve[0], reserve_space_2=reserve[1],
                reserve_space_3=reserve[2], epsilon=EPS, is_training=True)
            return dx, dscale, doffset
        return x_hat * scale + offset, gradient

    return affine(x, scale, offset)


def tensorflow_steps(shape):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal(shape, dtype="float32") * 2 + 0.5)
    dy = tf.constant(rng.standard_normal(shape, dtype="float32"))
    channels = shape[-1]
    gamma = tf.Variable(tf.ones([channels]) * 1.5)
    beta = tf.Variable(tf.zeros([channels]) + 0.1)
    mu = tf.constant(rng.standard_normal(channels, dtype="float32") * 0.1)
    sigma = tf.constant(1 + rng.random(channels, dtype="float32"))
    axes = [0, 1, 2]

    def corrections(mean, stddev):
        r = tf.clip_by_value(stddev / sigma, 1 / 3, 3.0)
        d = tf.clip_by_value((mean - mu) / sigma, -5.0, 5.0)
        return tf.stop_gradient(r), tf.stop_gradient(d)

    def keras_bn(x):
        mean, var = tf.nn.moments(x, axes)
        return tf.nn.batch_normalization(x, mean, var, beta, gamma, EPS)

    def portable(x):
        mean = tf.reduce_mean(x, axes, keepdims=True)
        var = tf.reduce_mean(tf.square(x - mean), axes)
        mean = tf.reshape(mean, [-1])
        stddev = tf.sqrt(var + EPS)
        r, d = corrections(mean, stddev)
        a = gamma * r / stddev
        return x * a + (gamma * d + beta - mean * a)

    def fused_bn(x):
        return tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, epsilon=EPS, is_training=True)[0]

    def fused_affine(x):
        x_hat, mean, var = tf.compat.v1.nn.fused_batch_norm(
            x, tf.ones([channels]), tf.zeros([channels]), epsilon=EPS,
            is_training=True)
        n = float(np.prod(shape[:-1]))
        stddev = tf.sqrt(tf.stop_gradient(var) * (n - 1) / n + EPS)
        r, d = corrections(tf.stop_gradient(mean), stddev)
        return x_hat * (gamma * r) + (gamma * d + beta)

    def fused_grad(x):
        x_hat, mean, var, *reserve = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=tf.ones([channels]), offset=tf.zeros([channels]),
            mean=tf.constant([], tf.float32),
            variance=tf.constant([], tf.float32), epsilon=EPS,
            is_training=True)
        n = float(np.prod(shape[:-1]))
        stddev = tf.sqrt(tf.stop_gradient(var) * (n - 1) / n + EPS)
        r, d = corrections(tf.stop_gradient(mean), stddev)
        return tf_affine_of_fused(x, x_hat, gamma * r, gamma * d + beta,
                                  reserve)

    def moments_fused(x):
        mean, var = tf.nn.moments(tf.stop_gradient(x), axes)
        r, d = corrections(mean, tf.sqrt(var + EPS))
        return tf.compat.v1.nn.fused_batch_norm(
            x, gamma * r, gamma * d + beta, epsilon=EPS, is_training=True)[0]

    def step_of(formula):
        return tf_step(formula, x, dy, gamma, beta)

    return {"keras-bn": step_of(keras_bn), "portable": step_of(portable),
            "fused-bn": step_of(fused_bn),
            "fused-affine": step_of(fused_affine),
            "fused-grad": step_of(fused_grad),
            "moments-fused": step_of(moments_fused)}


def torch_affine_of_fused():
    """The fast path's autograd function: `x_hat * scale + offset` in place,
    its backward one native_batch_norm_backward with that scale."""
    import torch

    class AffineOfFused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, x_hat, scale, offset, mean, invstd):
            ctx.save_for_backward(x, scale, mean, invstd)
            ctx.mark_dirty(x_hat)
            return x_hat.mul_(scale[:, None, None]).add_(offset[:, None, None])

        @staticmethod
        def backward(ctx, dy):
            x, scale, mean, invstd = ctx.saved_tensors
            dx, dscale, doffset = torch.ops.aten.native_batch_norm_backward(
                dy, x, scale, None, None, mean, invstd, True, EPS,
                [True, True, True])
            return dx, None, dscale, doffset, None, None

    return AffineOfFused


def torch_steps(shape):
    import torch

    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal(shape, dtype="float32") * 2 + 0.5,
                     requires_grad=True)
    dy = torch.tensor(rng.standard_normal(shape, dtype="float32"))
    channels = shape[-1]
    gamma = torch.full((channels,), 1.5, requires_grad=True)
    beta = torch.full((channels,), 0.1, requires_grad=True)
    mu = torch.tensor(rng.standard_normal(channels, dtype="float32") * 0.1)
    sigma = torch.tensor(1 + rng.random(channels, dtype="float32"))
    dims = (0, 1, 2)

    def corrections(mean, stddev):
        r = torch.clamp(stddev / sigma, 1 / 3, 3.0)
        d = torch.clamp((mean - mu) / sigma, -5.0, 5.0)
        return r.detach(), d.detach()

    def keras_bn(x):
        mean = x.mean(dims, keepdim=True)
        var = torch.square(x).mean(dims, keepdim=True) - torch.square(mean)
        return x.subtract(mean).mul_(var.add(EPS).rsqrt_().mul(gamma)).add_(
            beta)

    def portable(x):
        mean = x.mean(dims, keepdim=True)
        var = torch.square(x - mean).mean(dims)
        mean = mean.reshape(-1)
        stddev = torch.sqrt(var + EPS)
        r, d = corrections(mean, stddev)
        a = gamma * r / stddev
        return x * a + (gamma * d + beta - mean * a)

    def native_bn(x):
        return torch.batch_norm(x.permute(0, 3, 1, 2), gamma, beta, None,
                                None, True, 0.0, EPS, False).permute(0, 2, 3, 1)

    def native_affine(x):
        x_hat, mean, invstd = torch.native_batch_norm(
            x.permute(0, 3, 1, 2), None, None, None, None, True, 0.0, EPS)
        r, d = corrections(mean.detach(), 1 / invstd.detach())
        return x_hat.permute(0, 2, 3, 1) * (gamma * r) + (gamma * d + beta)

    def varmean_native(x):
        with torch.no_grad():
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            r, d = corrections(mean, torch.sqrt(var + EPS))
        return torch.batch_norm(x.permute(0, 3, 1, 2), gamma * r,
                                gamma * d + beta, None, None, True, 0.0, EPS,
                                False).permute(0, 2, 3, 1)

    AffineOfFused = torch_affine_of_fused()

    def native_grad(x):
        x = x.permute(0, 3, 1, 2)
        with torch.no_grad():
            x_hat, mean, invstd = torch.native_batch_norm(
                x, None, None, None, None, True, 0.0, EPS)
            r, d = corrections(mean, 1 / invstd)
        return AffineOfFused.apply(x, x_hat, gamma * r, gamma * d + beta,
                                   mean, invstd).permute(0, 2, 3, 1)

    def step_of(formula):
        return torch_step(formula, x, dy, gamma, beta)

    return {"keras-bn": step_of(keras_bn), "portable": step_of(portable),
            "native-bn": step_of(native_bn),
            "native-affine": step_of(native_affine),
            "varmean-native": step_of(varmean_native),
            "native-grad": step_of(native_grad)}


def tensorflow_group_steps(shape, size):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal(shape, dtype="float32") * 2 + 0.5)
    dy = tf.constant(rng.standard_normal(shape, dtype="float32"))
    n, h, w, c = shape
    groups = n // size
    gamma = tf.Variable(tf.ones([c]) * 1.5)
    beta = tf.Variable(tf.zeros([c]) + 0.1)
    mu = tf.constant(rng.standard_normal(c, dtype="float32") * 0.1)
    sigma = tf.constant(1 + rng.random(c, dtype="float32"))

    def corrections(mean, stddev):
        r = tf.clip_by_value(stddev / sigma, 1 / 3, 3.0)
        d = tf.clip_by_value((mean - mu) / sigma, -5.0, 5.0)
        return tf.stop_gradient(r), tf.stop_gradient(d)

    def normalize(x, axes):
        mean = tf.reduce_mean(x, axes, keepdims=True)
        var = tf.reduce_mean(tf.square(x - mean), axes, keepdims=True)
        stddev = tf.sqrt(var + EPS)
        r, d = corrections(mean, stddev)
        a = gamma * r / stddev
        return x * a + (gamma * d + beta - mean * a)

    def portable(x):
        grouped = tf.reshape(x, (groups, size, h, w, c))
        return tf.reshape(normalize(grouped, [1, 2, 3]), shape)

    def whole_batch(x):
        return normalize(x, [0, 1, 2])

    def fused_transposed(x):
        wide = tf.reshape(tf.transpose(tf.reshape(
            x, (groups, size, h, w, c)), (1, 2, 3, 0, 4)),
            (size, h, w, groups * c))
        x_hat, mean, var, *reserve = tf.raw_ops.FusedBatchNormV3(
            x=wide, scale=tf.ones([groups * c]),
            offset=tf.zeros([groups * c]), mean=tf.constant([], tf.float32),
            variance=tf.constant([], tf.float32), epsilon=EPS,
            is_training=True)
        m = float(size * h * w)
        mean = tf.reshape(tf.stop_gradient(mean), (groups, c))
        stddev = tf.sqrt(tf.reshape(tf.stop_gradient(var), (groups, c))
                         * (m - 1) / m + EPS)
        r, d = corrections(mean, stddev)
        scale = tf.reshape(gamma * r, [-1])
        offset = tf.reshape(gamma * d + beta, [-1])
        y = tf_affine_of_fused(wide, x_hat, scale, offset, reserve)
        return tf.reshape(tf.transpose(tf.reshape(
            y, (size, h, w, groups, c)), (3, 0, 1, 2, 4)), shape)

    def step_of(formula):
        return tf_step(formula, x, dy, gamma, beta)

    return {"portable": step_of(portable),
            "whole-batch": step_of(whole_batch),
            "fused-transposed": step_of(fused_transposed)}


def torch_group_steps(shape, size):
    import torch

    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal(shape, dtype="float32") * 2 + 0.5,
                     requires_grad=True)
    dy = torch.tensor(rng.standard_normal(shape, dtype="float32"))
    n, h, w, c = shape
    groups = n // size
    gamma = torch.full((c,), 1.5, requires_grad=True)
    beta = torch.full((c,), 0.1, requires_grad=True)
    mu = torch.tensor(rng.standard_normal(c, dtype="float32") * 0.1)
    sigma = torch.tensor(1 + rng.random(c, dtype="float32"))

    def corrections(mean, stddev):
        r = torch.clamp(stddev / sigma, 1 / 3, 3.0)
        d = torch.clamp((mean - mu) / sigma, -5.0, 5.0)
        return r.detach(), d.detach()

    def normalize(x, dims):
        mean = x.mean(dims, keepdim=True)
        stddev = torch.sqrt(torch.square(x - mean).mean(dims, keepdim=True)
                            + EPS)
        r, d = corrections(mean, stddev)
        a = gamma * r / stddev
        return x * a + (gamma * d + beta - mean * a)

    def portable(x):
        return normalize(x.reshape(groups, size, h, w, c),
                         (1, 2, 3)).reshape(shape)

    def whole_batch(x):
        return normalize(x, (0, 1, 2))

    def native_transposed(x):
        wide = x.reshape(groups, size, h, w, c).permute(1, 0, 4, 2, 3)
        wide = wide.reshape(size, groups * c, h, w)  # a copy
        y = torch.batch_norm(wide, None, None, None, None, True, 0.0, EPS,
                             False)
        with torch.no_grad():
            var, mean = torch.var_mean(wide, dim=(0, 2, 3), correction=0)
            r, d = corrections(mean.reshape(groups, c),
                               torch.sqrt(var.reshape(groups, c) + EPS))
        scale = (gamma * r).reshape(-1)[:, None, None]
        offset = (gamma * d + beta).reshape(-1)[:, None, None]
        y = y * scale + offset
        return y.reshape(size, groups, c, h, w).permute(1, 0, 3, 4, 2
                                                        ).reshape(shape)

    AffineOfFused = torch_affine_of_fused()

    def native_grad_transposed(x):
        wide = x.reshape(groups, size, h, w, c).permute(1, 0, 4, 2, 3)
        wide = wide.reshape(size, groups * c, h, w)  # a copy
        with torch.no_grad():
            x_hat, mean, invstd = torch.native_batch_norm(
                wide, None, None, None, None, True, 0.0, EPS)
            r, d = corrections(mean.reshape(groups, c),
                               1 / invstd.reshape(groups, c))
        y = AffineOfFused.apply(wide, x_hat, (gamma * r).reshape(-1),
                                (gamma * d + beta).reshape(-1), mean, invstd)
        return y.reshape(size, groups, c, h, w).permute(1, 0, 3, 4, 2
                                                        ).reshape(shape)

    def step_of(formula):
        return torch_step(formula, x, dy, gamma, beta)

    return {"portable": step_of(portable),
            "whole-batch": step_of(whole_batch),
            "native-transposed": step_of(native_transposed),
            "native-grad-transposed": step_of(native_grad_transposed)}


def jax_steps(shape):
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape, dtype="float32") * 2 + 0.5)
    dy = jnp.asarray(rng.standard_normal(shape, dtype="float32"))
    channels = shape[-1]
    params = (jnp.full((channels,), 1.5), jnp.full((channels,), 0.1))
    mu = jnp.asarray(rng.standard_normal(channels, dtype="float32") * 0.1)
    sigma = jnp.asarray(1 + rng.random(channels, dtype="float32"))
    axes = (0, 1, 2)

    def corrections(mean, stddev):
        r = jnp.clip(stddev / sigma, 1 / 3, 3.0)
        d = jnp.clip((mean - mu) / sigma, -5.0, 5.0)
        return jax.lax.stop_gradient(r), jax.lax.stop_gradient(d)

    def keras_bn(x, gamma, beta):
        mean = jnp.mean(x, axes)
        inv = jax.lax.rsqrt(jnp.var(x, axes) + EPS) * gamma
        return x * inv + (beta - mean * inv)

    def renorm(x, gamma, beta, mean, var):
        stddev = jnp.sqrt(var + EPS)
        r, d = corrections(mean, stddev)
        a = gamma * r / stddev
        return x * a + (gamma * d + beta - mean * a)

    def portable(x, gamma, beta):
        mean = jnp.mean(x, axes, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axes)
        return renorm(x, gamma, beta, mean.reshape(-1), var)

    def one_pass(x, gamma, beta):
        shift = jax.lax.stop_gradient(x[:1, :1, :1])
        shifted = x - shift
        mean_s = jnp.mean(shifted, axes)
        var = jnp.maximum(jnp.mean(jnp.square(shifted), axes)
                          - jnp.square(mean_s), 0.0)
        return renorm(x, gamma, beta, mean_s + shift.reshape(-1), var)

    def one_read(x, gamma, beta):
        mean = jnp.mean(x, axes)
        mean_square = jnp.mean(jnp.square(x), axes)
        var = jnp.maximum(mean_square - jnp.square(mean), 0.0)
        exact = jax.lax.stop_gradient(jax.lax.cond(
            jnp.any(mean_square > 1e3 * var),
            lambda: jnp.mean(jnp.square(x - mean), axes), lambda: var))
        var = var + jax.lax.stop_gradient(exact - var)
        return renorm(x, gamma, beta, mean, var)

    def step_of(formula):
        grad = jax.jit(jax.grad(
            lambda x, p: jnp.sum(formula(x, *p) * dy), argnums=(0, 1)))

        def step():
            gx, (gg, gb) = grad(x, params)
            return [np.asarray(g) for g in (gx, gg, gb)]

        return step

    return {"keras-bn": step_of(keras_bn), "portable": step_of(portable),
            "one-pass": step_of(one_pass), "one-read": step_of(one_read)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("framework", choices=("tensorflow", "torch", "jax"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--groups", type=int, metavar="V",
                        help="virtual batches of V examples (tensorflow, "
                        "torch; V must divide --batch-size)")
    args = parser.parse_args()
    shape = (args.batch_size, 32, 32, args.channels)
    if args.groups:
        if args.framework == "jax" or args.batch_size % args.groups:
            parser.error("--groups V: tensorflow or torch, V dividing "
                         "--batch-size")
        make = {"tensorflow": tensorflow_group_steps,
                "torch": torch_group_steps}[args.framework]
        steps = make(shape, args.groups)
    else:
        make = {"tensorflow": tensorflow_steps, "torch": torch_steps,
                "jax": jax_steps}[args.framework]
        steps = make(shape)
    grads = {name: step() for name, step in steps.items()}  # warm-up
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - started) / args.steps)
    base = statistics.median(times["portable"])
    print(f"{args.framework}, {shape}, median of {args.repeats} x "
          f"{args.steps} steps:")
    for name, values in times.items():
        median = statistics.median(values)
        diffs = [float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) or 1))
                 for a, b in zip(grads[name], grads["portable"])]
        print(f"  {name:15} {1000 * median:8.1f} ms  x{median / base:.2f} of "
              f"portable; gradients (x, gamma, beta) differ by "
              + ", ".join(f"{d:.1e}" for d in diffs) + " (relative)")
    if args.groups:
        print("  (whole-batch: no groups, its gradients differ by design)")
        return
    gammas = {"tensorflow": ("keras-bn", "fused-bn"),
              "torch": ("keras-bn", "native-bn"),
              "jax": ("keras-bn",)}[args.framework]
    print(f"  ({', '.join(gammas)}: plain BN with the same gamma, beta; "
          "their gradients differ from BRN's by design)")


if __name__ == "__main__":
    main()
