#!/usr/bin/env python3
"""Speed of BatchRenormalization against BatchNormalization, side by side.

  python benchmarks/bench.py                       # layer + model level, this backend
  python benchmarks/bench.py --backend jax         # another Keras backend
  python benchmarks/bench.py --level input         # the input pipeline's share
  python benchmarks/bench.py --level jit           # jit_compile on / off
  python benchmarks/bench.py --summary --readme docs/speed.md   # tables only

Levels (`--level`, several allowed; default `layer model`):
  layer  forward + backward of one normalization layer on (B, 32, 32, C) for
         each --channels C, training mode, compiled as model.fit compiles it
         (train_on_batch of a model: a trainable scalar times the input, so
         that the layer's backward computes its input gradient, then the
         layer; MSE loss, SGD).
  matrix the layer where a user meets it, on (B, 32, 32, C) for each
         --batch-sizes B and the first --channels C: on the model's input
         (no input gradient), with a ReLU after it, after a trainable scale
         (the layer level's setup), and four norm + ReLU after the scale;
         renorm and renorm-portable with the bounds moving at every step
         (`@ramp`) and with fixed clipping (`@fixed`).
  model  WRN-DEPTH-WIDTH (default 16-4) training steps on (B, 32, 32, 3).
  input  WRN training steps of batchnorm fed by train.py's input pipeline
         (`host`: sampling.train_batches; `device`: device_data, where it
         exists) against the same steps on batches already in memory
         (`resident`): the share of an epoch spent waiting for data.
  jit    WRN training steps of batchnorm and of renorm with jit_compile off
         and on (ratios to the same norm with jit_compile off).
  loop   JAX only: train.py's epochs on the training set kept on the device,
         run by Keras's loop one step per call (`per-step`) and as one
         compiled program of the repeat's --steps steps (`compiled`:
         experiment/compiled_epoch.py), for batchnorm and renorm, Adam and
         the accuracy metric as train.py (ratios to `batchnorm, per-step`;
         `norm_ratio`: renorm over batchnorm in the same loop and round).

Every variant of a level is built and warmed up (compilation included)
first; then the repeats run interleaved (A B C A B C ...), each timing
--steps steps that end with the device done. Reported: median ms per step
over the repeats, the spread (min-max), images/s, and the ratio to Keras's
batchnorm: the median over the repeats of the two times of the same repeat.
Variants: `batchnorm` (keras.layers.BatchNormalization),
`renorm` (batch_renorm.BatchRenormalization, on its fast path where the
backend has one), `renorm-tracked` (the same with track_corrections=True;
only when --variants names it), `renorm-portable` (the same layer on its keras.ops path,
only where a fast path exists), `keras-renorm` (Keras 3's renorm=True), and,
on TensorFlow with tf_keras installed, `tf.keras-batchnorm` (tf.keras's fused
BatchNormalization) and `tf.keras-renorm` (tf.keras's renorm=True, not
fused) as outside anchors.

On a shared machine a ratio also moves from one process to the next (with
two threads on two cores, one layer's ratio scattered by +-10% between
processes, see NOTES.md): `--cpus 0` pins the run, the framework's threads
included, to one core, and `--processes N` repeats the measurement in N
fresh processes and pools their rounds.

Each run writes benchmarks/results/BACKEND-DEVICE.csv and .json (-xla
added for TensorFlow with jit_compile on) with the rows, backend, device,
versions and thread count (a rerun of a level replaces its rows), then
rewrites benchmarks/results/summary.md from every results file, and with
--readme FILE (docs/speed.md) the block of FILE between
`<!-- bench.md begins -->` and `<!-- bench.md ends -->`.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiment import runfiles  # noqa: E402 (after the path)
from experiment import runtime  # noqa: E402
from experiment.cli import Parser  # noqa: E402
from experiment.cli import UsageError  # noqa: E402
from experiment.cli import nonnegative_int  # noqa: E402
from experiment.cli import positive_int  # noqa: E402
from experiment.cli import steps_or_auto  # noqa: E402
from experiment.startup import quiet_startup  # noqa: E402

PROG = "bench.py"
LEVELS = ("layer", "matrix", "model", "input", "jit", "devices", "loop")
NORM_VARIANTS = ("batchnorm", "renorm", "renorm-portable", "renorm-groups4",
                 "keras-renorm", "tf.keras-batchnorm", "tf.keras-renorm",
                 "renorm-tracked")
# Measured only when asked for (--variants): renorm with
# track_corrections=True, the cost of train.py's --track-corrections.
ON_REQUEST = ("renorm-tracked",)
# renorm-groups4: virtual_batch_size=4, the paper's micro-batches.
GROUP_SIZE = 4
RESULTS_DIR = ROOT / "benchmarks" / "results"
README_BEGIN = "<!-- bench.md begins -->"
README_END = "<!-- bench.md ends -->"
COLUMNS = ("level", "shape", "variant", "ms_per_step", "ms_min", "ms_max",
           "images_per_s", "ratio", "repeats", "steps")


def build_parser():
    parser = Parser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--backend", choices=("tensorflow", "jax", "torch"),
                        help="Keras backend (default: KERAS_BACKEND, or "
                        "Keras's default)")
    parser.add_argument("--level", nargs="+", choices=LEVELS,
                        default=["layer", "model"], metavar="LEVEL",
                        help=f"{', '.join(LEVELS)} (default: layer model)")
    parser.add_argument("--variants", nargs="+", choices=NORM_VARIANTS,
                        metavar="VARIANT",
                        help="normalizations to compare (default: all that "
                        "this backend has)")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+",
                        default=list(LAYER_BATCH_SIZES), metavar="B",
                        help="matrix level: the batch sizes (default: "
                        + " ".join(map(str, LAYER_BATCH_SIZES)) + ")")
    parser.add_argument("--setups", nargs="+", choices=tuple(LAYER_SETUPS),
                        default=list(LAYER_SETUPS), metavar="SETUP",
                        help="matrix level: where the layer sits (default: "
                        + " ".join(LAYER_SETUPS) + ")")
    parser.add_argument("--channels", type=positive_int, nargs="+",
                        default=[64, 128, 256], help="layer level: C of "
                        "(B, 32, 32, C) (default: 64 128 256)")
    parser.add_argument("--depth", type=positive_int, default=16,
                        help="model level: WRN depth (default 16)")
    parser.add_argument("--width", type=positive_int, default=4,
                        help="model level: WRN width (default 4)")
    parser.add_argument("--steps", type=positive_int,
                        help="training steps per timed repeat (default on a "
                        "CPU: 3 for a layer, 2 for a model; on a GPU: 50)")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed repeats of each variant (default 5)")
    parser.add_argument("--warmup", type=positive_int, default=2,
                        help="untimed steps per variant first (default 2)")
    parser.add_argument("--steps-per-execution", type=steps_or_auto,
                        default="auto", metavar="N", help="input level: as "
                        "train.py's (default auto: 1 on a CPU)")
    parser.add_argument("--dtype-policy", default="float32",
                        choices=("float32", "mixed_float16", "mixed_bfloat16"),
                        help="Keras dtype policy of every model (default "
                        "float32)")
    parser.add_argument("--jit-compile", choices=("auto", "on", "off"),
                        default="auto", help="as train.py's (default auto: "
                        "for TensorFlow on a CPU, on where the CPU lacks "
                        "AVX-512; Keras's choice elsewhere)")
    parser.add_argument("--data-dir", type=Path, help="CIFAR-10 for the "
                        "input level (default: CIFAR10_DIR, ../shared/data, "
                        "else random images of the same shape)")
    parser.add_argument("--cpus", type=nonnegative_int, nargs="+",
                        metavar="CPU", help="run on these CPUs only (the "
                        "framework's threads too), e.g. `--cpus 0` for one "
                        "core (default: every CPU this process may use)")
    parser.add_argument("--processes", type=positive_int, default=1,
                        metavar="N", help="measure in N fresh processes, one "
                        "after another, and pool their rounds (default 1); "
                        "not for the input level")
    parser.add_argument("--worker-output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--summary", action="store_true",
                        help="only rewrite summary.md (and --readme) from "
                        "the results files")
    parser.add_argument("--readme", type=Path,
                        help="also replace the bench.md block of FILE "
                        "(docs/speed.md)")
    return parser


# ---------------------------------------------------------------- timing
def time_interleaved(steppers, steps, repeats, warmup):
    """`steppers`: name -> function(n) that runs n training steps and returns
    once the device is done. Warms each up, then times `repeats` rounds of
    every stepper in turn; returns name -> list of seconds per step."""
    for name, run in steppers.items():
        started = time.perf_counter()
        run(warmup)
        print(f"  warm-up {name}: {time.perf_counter() - started:.1f} s",
              flush=True)
    times = {name: [] for name in steppers}
    for repeat in range(repeats):
        for name, run in steppers.items():
            started = time.perf_counter()
            run(steps)
            times[name].append((time.perf_counter() - started) / steps)
        print(f"  repeat {repeat + 1}/{repeats}: " + ", ".join(
            f"{n} {1000 * t[-1]:.1f} ms" for n, t in times.items()),
            flush=True)
    return times


def rows_of(level, shape, times, batch_size, steps, baseline):
    """A row per variant: median and spread of its seconds per step, and its
    ratio to `baseline`: the median over the rounds of the two times of the
    same round (measured next to each other, so that the machine's drift and
    other load cancel out)."""
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        ratio = None
        if baseline in times:
            ratio = round(statistics.median(
                [v / b for v, b in zip(values, times[baseline])]), 4)
        rows.append({
            "level": level, "shape": shape, "variant": name,
            "ms_per_step": round(1000 * median, 3),
            "ms_min": round(1000 * min(values), 3),
            "ms_max": round(1000 * max(values), 3),
            "images_per_s": round(batch_size / median, 2),
            "ratio": ratio, "repeats": len(values), "steps": steps,
            "ms_repeats": [round(1000 * v, 3) for v in values],
            "baseline": baseline, "batch_size": batch_size})
    return rows


def pooled_rows(runs):
    """The rows of several processes' runs of the same levels (a list of
    row lists) as one run's: each group's (level, shape) rounds joined in
    process order, so that every round keeps its own baseline."""
    groups = {}
    for rows in runs:
        for row in rows:
            times = groups.setdefault((row["level"], row["shape"]), {})
            times.setdefault(row["variant"], []).extend(
                ms / 1000 for ms in row["ms_repeats"])
    first = {(row["level"], row["shape"]): row for row in runs[0]}
    pooled = []
    for (level, shape), times in groups.items():
        row = first[level, shape]
        pooled += rows_of(level, shape, times, row["batch_size"],
                          row["steps"], row["baseline"])
    return pooled


# ---------------------------------------------------------------- variants
def available_variants(keras, requested):
    import batch_renorm

    names = ["batchnorm", "renorm"]
    if batch_renorm.has_fast_path():
        names.append("renorm-portable")
    names += ["renorm-groups4", "keras-renorm"]
    if keras.backend.backend() == "tensorflow" and tf_keras() is not None:
        names += ["tf.keras-batchnorm", "tf.keras-renorm"]
    if requested:
        names += list(ON_REQUEST)
        missing = [v for v in requested if v not in names]
        if missing:
            raise UsageError(f"variant(s) {', '.join(missing)} not available "
                             f"on this backend (available: {', '.join(names)})")
        names = [v for v in names if v in requested]
    return names


def tf_keras():
    try:
        with quiet_startup():  # it imports TensorFlow, on any backend
            import tf_keras as module
    except ImportError:
        return None
    return module


def norm_factory(keras, variant):
    """A function(**layer kwargs) -> normalization layer, and the Keras API
    (keras, or tf_keras for the anchors) that builds the model around it."""
    from models.norms import make_norm

    if variant.startswith("tf.keras-"):
        api = tf_keras()
        renorm = variant == "tf.keras-renorm"

        def make(**kwargs):
            extra = dict(renorm=True, renorm_momentum=0.99, renorm_clipping={
                "rmin": 1 / 3, "rmax": 3.0, "dmax": 5.0}) if renorm else {}
            # fused=None: tf.keras fuses where it can (not with renorm).
            return api.layers.BatchNormalization(momentum=0.99, epsilon=1e-3,
                                                 **extra, **kwargs)
        return make, api
    if variant == "renorm-portable":
        return (lambda **kwargs: make_norm("renorm", fused=False, **kwargs),
                keras)
    if variant == "renorm-tracked":
        return (lambda **kwargs: make_norm(
            "renorm", track_corrections=True, **kwargs), keras)
    if variant == "renorm-groups4":
        return (lambda **kwargs: make_norm(
            "renorm", virtual_batch_size=GROUP_SIZE, **kwargs), keras)
    return (lambda **kwargs: make_norm(variant, **kwargs)), keras


def compile_model(model, api, jit, loss="sparse_categorical_crossentropy"):
    model.compile(optimizer=api.optimizers.SGD(learning_rate=1e-3),
                  loss=loss, jit_compile=jit)


def stepper(model, api, x, y):
    """A function(n) that runs n training steps of `model` on the batch
    (x, y) with the model's compiled train step, and waits for the device."""
    if api is tf_keras():
        # tf.keras's train_on_batch builds a tf.data pipeline at each call;
        # fit's own path is its train_function on an iterator.
        import tensorflow as tf

        iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
        model.make_train_function()

        def run_tf_keras(steps):
            for _ in range(steps):
                logs = model.train_function(iterator)
            float(logs["loss"])
        return run_tf_keras

    def run(steps):
        for _ in range(steps):
            loss = model.train_on_batch(x, y)
        float(loss if not isinstance(loss, list) else loss[0])
    return run


# Layer matrix (`layer_matrix`): where a user meets the layer. name ->
# (input gradient: the layer after a trainable scale, not on the model's
# input; how many norm layers in a row; a ReLU after each).
LAYER_SETUPS = {
    "input": (False, 1, False),
    "input-relu": (False, 1, True),
    "scale": (True, 1, False),
    "stack4-relu": (True, 4, True),
}
LAYER_BATCH_SIZES = (16, 64, 256)
# The renorm variants' two regimes: bounds that move at every step (the
# schedule's ramp) and fixed clipping from the first step.
LAYER_SCHEDULES = {
    "ramp": dict(warmup_steps=0, r_max_steps=10**6, d_max_steps=10**6),
    "fixed": dict(warmup_steps=0, r_max_steps=0, d_max_steps=0),
}


def layer_model(keras, variant, shape, setup="scale", schedule=None):
    """Normalization layers on `shape`, as `LAYER_SETUPS[setup]` says; the
    default, "scale", is one layer after a trainable scalar scale, so that
    its backward pass computes the gradient with respect to its input, as
    in a network (the gradients of a model's own inputs are not computed).
    `schedule`: renorm keyword arguments (`LAYER_SCHEDULES`), for the renorm
    variants only."""
    make, api = norm_factory(keras, variant)
    extra = schedule if schedule and variant.startswith("renorm") else {}
    input_gradient, count, relu = LAYER_SETUPS[setup]

    class Scale(api.layers.Layer):
        def build(self, input_shape):
            self.scale = self.add_weight(shape=(), initializer="ones",
                                         name="scale")

        def call(self, x):
            return x * self.scale

    inputs = api.Input(shape[1:])
    outputs = Scale(name="scale")(inputs) if input_gradient else inputs
    for i in range(count):
        outputs = make(name="norm" if count == 1 else f"norm{i}",
                       **extra)(outputs)
        if relu:
            outputs = api.layers.ReLU()(outputs)
    return api.Model(inputs, outputs), api


def layer_matrix(channels=64, batch_sizes=LAYER_BATCH_SIZES,
                 setups=tuple(LAYER_SETUPS), schedules=tuple(LAYER_SCHEDULES),
                 variants=None, steps=3, repeats=5, warmup=2, jit="auto"):
    """Layer-level rows for every batch size, setup and renorm schedule on
    (B, 32, 32, channels), on the current Keras backend: what a user meets
    (the layer on a model's input or inside a stack, with or without a
    ReLU, bounds moving or fixed). Variants are named `renorm@ramp`,
    `renorm-portable@fixed`, ...; ratios are to `batchnorm` of the same
    round. `bench.py --level matrix` runs it."""
    import numpy as np
    import keras

    rng = np.random.default_rng(0)
    names = available_variants(keras, variants)
    rows = []
    for batch_size in batch_sizes:
        shape = (batch_size, 32, 32, channels)
        x = rng.standard_normal(shape, dtype="float32") * 2 + 0.5
        y = rng.standard_normal(shape, dtype="float32")
        for setup in setups:
            print(f"layer matrix, {shape}, {setup}:", flush=True)
            steppers = {}
            for variant in names:
                regimes = schedules if variant.startswith("renorm") else [None]
                for regime in regimes:
                    model, api = layer_model(
                        keras, variant, shape, setup,
                        LAYER_SCHEDULES[regime] if regime else None)
                    compile_model(model, api, jit, loss="mse")
                    name = variant + (f"@{regime}" if regime else "")
                    steppers[name] = stepper(model, api, to_tensor(api, x),
                                             to_tensor(api, y))
            times = time_interleaved(steppers, steps, repeats, warmup)
            rows += rows_of("matrix", "x".join(map(str, shape)) + f" {setup}",
                            times, batch_size, steps, "batchnorm")
    return rows


def wrn_model(keras, variant, depth, width):
    from models import wide_resnet

    make, api = norm_factory(keras, variant)
    return wide_resnet(depth, width, norm=make, keras_api=api), api


def to_tensor(api, array):
    if api is tf_keras():
        import tensorflow as tf

        return tf.convert_to_tensor(array)
    return api.ops.convert_to_tensor(array)


def bench_layer(keras, args, variants, jit, rng, environment):
    rows = []
    steps = layer_steps(args, environment)
    for channels in args.channels:
        shape = (args.batch_size, 32, 32, channels)
        print(f"layer level, {shape}:", flush=True)
        x = (rng.standard_normal(shape, dtype="float32") * 2 + 0.5)
        y = rng.standard_normal(shape, dtype="float32")
        steppers = {}
        for variant in variants:
            model, api = layer_model(keras, variant, shape)
            compile_model(model, api, jit, loss="mse")
            steppers[variant] = stepper(model, api, to_tensor(api, x),
                                        to_tensor(api, y))
        times = time_interleaved(steppers, steps, args.repeats, args.warmup)
        rows += rows_of("layer", "x".join(map(str, shape)), times,
                        args.batch_size, steps, "batchnorm")
    return rows


def layer_steps(args, environment):
    return args.steps or (3 if environment["device_type"] == "cpu" else 50)


def model_steps(args, environment):
    if args.steps:
        return args.steps
    return 2 if environment["device_type"] == "cpu" else 50


def wrn_batch(args, rng):
    x = rng.standard_normal((args.batch_size, 32, 32, 3), dtype="float32")
    y = rng.integers(0, 10, args.batch_size).astype("int32")
    return x, y


def bench_model(keras, args, variants, jit, rng, environment):
    steps = model_steps(args, environment)
    name = f"WRN-{args.depth}-{args.width}"
    print(f"model level, {name}, batch {args.batch_size}:", flush=True)
    x, y = wrn_batch(args, rng)
    steppers = {}
    for variant in variants:
        model, api = wrn_model(keras, variant, args.depth, args.width)
        compile_model(model, api, jit)
        steppers[variant] = stepper(model, api, to_tensor(api, x),
                                    to_tensor(api, y))
    times = time_interleaved(steppers, steps, args.repeats, args.warmup)
    return rows_of("model", f"{name}, {args.batch_size}x32x32x3", times,
                   args.batch_size, steps, "batchnorm")


def bench_jit(keras, args, rng, environment):
    """WRN steps of batchnorm and renorm with jit_compile off and on; each
    ratio is to the same norm's jit_compile=off."""
    steps = model_steps(args, environment)
    name = f"WRN-{args.depth}-{args.width}"
    x, y = wrn_batch(args, rng)
    rows = []
    for norm in ("batchnorm", "renorm"):
        print(f"jit_compile, {name} with {norm}:", flush=True)
        steppers = {}
        for setting in ("off", "on"):
            model, api = wrn_model(keras, norm, args.depth, args.width)
            compile_model(model, api, setting == "on")
            steppers[f"{norm}, jit_compile={setting}"] = stepper(
                model, api, to_tensor(api, x), to_tensor(api, y))
        times = time_interleaved(steppers, steps, args.repeats, args.warmup)
        rows += rows_of("jit", f"{name}, {args.batch_size}x32x32x3", times,
                        args.batch_size, steps, f"{norm}, jit_compile=off")
    return rows


def bench_devices(keras, args, rng, environment):
    """JAX: WRN steps on one device and data parallel on every local device
    (`keras.distribution.DataParallel`: the batch split, the moments of the
    global batch), and on every device with per-device statistics
    (`virtual_batch_size` = the per-device batch); each ratio is to the same
    norm on one device. On a CPU, several devices come from
    XLA_FLAGS=--xla_force_host_platform_device_count=N."""
    if keras.backend.backend() != "jax":
        raise UsageError("--level devices needs the jax backend (Keras's "
                         "distribution API)")
    devices = keras.distribution.list_devices()
    if len(devices) < 2:
        raise UsageError(
            "--level devices needs several devices; JAX sees one (on a CPU: "
            "XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    if args.batch_size % len(devices):
        raise UsageError(f"--batch-size {args.batch_size} does not split "
                         f"over {len(devices)} devices")
    from models import wide_resnet
    from models.norms import make_norm

    steps = model_steps(args, environment)
    name = f"WRN-{args.depth}-{args.width}"
    # NumPy batches for all: each step moves (and under DataParallel
    # splits) its batch, the same work for every setting.
    x, y = wrn_batch(args, rng)
    parallel = keras.distribution.DataParallel(devices=devices)
    per_device = args.batch_size // len(devices)
    rows = []
    for norm in ("batchnorm", "renorm"):
        print(f"devices, {name} with {norm}:", flush=True)
        settings = {f"{norm}, 1 device": (None, {}),
                    f"{norm}, {len(devices)} devices": (parallel, {})}
        if norm == "renorm":
            settings[f"{norm}, {len(devices)} devices, per-device "
                     "statistics"] = (parallel, dict(
                         virtual_batch_size=per_device))
        steppers = {}
        for label, (distribution, extra) in settings.items():
            def make_stepper(extra=extra, norm=norm):
                model = wide_resnet(args.depth, args.width, norm=lambda **kw:
                                    make_norm(norm, **kw, **extra))
                compile_model(model, keras, True)
                return stepper(model, keras, x, y)
            steppers[label] = in_distribution(distribution, make_stepper)
        times = time_interleaved(steppers, steps, args.repeats, args.warmup)
        rows += rows_of("devices", f"{name}, {args.batch_size}x32x32x3",
                        times, args.batch_size, steps, f"{norm}, 1 device")
    return rows


def in_distribution(distribution, make_stepper):
    """A stepper built and run under `distribution` (None: one device)."""
    if distribution is None:
        return make_stepper()
    with distribution.scope():
        run = make_stepper()

    def run_in_scope(steps):
        with distribution.scope():
            run(steps)
    return run_in_scope


def bench_input(keras, args, jit, rng, environment):
    """train.py's training loop (model.fit on an epoch's generator, with its
    --steps-per-execution) for batchnorm and renorm, fed by each of its
    input pipelines (`host`: sampling.train_batches, NumPy; `device`:
    device_data.DeviceTrainSet, keras.ops on the device; both augmented) and
    by batches made beforehand (`resident`: no input work at all)."""
    from experiment import device_data
    from experiment import sampling
    from experiment.preprocessing import channel_stats

    images, labels, source = training_images(args, rng)
    mean, std = channel_stats(images)
    steps = model_steps(args, environment)
    per_execution = runtime.resolve_steps_per_execution(
        args.steps_per_execution, environment, steps)
    name = f"WRN-{args.depth}-{args.width}"
    print(f"input level, {name}, {steps} steps per repeat, "
          f"steps_per_execution={per_execution}, data: {source}", flush=True)
    on_device = device_data.DeviceTrainSet(images, labels, mean, std,
                                           augmented=True)
    resident_batches = [tuple(map(keras.ops.convert_to_tensor, b)) for b in
                sampling.train_batches(images[:args.batch_size * 2],
                                      labels[:args.batch_size * 2],
                                      args.batch_size, mean, std, rng)]
    epoch = [0]
    pipelines = {
        "resident": lambda: cycle(resident_batches),
        "host": lambda: sampling.train_batches(
            images, labels, args.batch_size, mean, std,
            sampling.epoch_rng(0, epoch[0]), augmented=True),
        "device": lambda: on_device.train_batches(
            args.batch_size, sampling.epoch_rng(0, epoch[0])),
    }

    def fit_on(model, make_batches):
        def run(n):
            epoch[0] += 1
            model.fit(make_batches(), steps_per_epoch=n, epochs=1,
                      verbose=0, shuffle=False)
            keras.ops.convert_to_numpy(model.optimizer.iterations)
        return run

    steppers = {}
    for norm in ("batchnorm", "renorm"):
        model, _ = wrn_model(keras, norm, args.depth, args.width)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=1e-3),
                      loss="sparse_categorical_crossentropy",
                      jit_compile=jit, steps_per_execution=per_execution)
        for pipeline, make in pipelines.items():
            steppers[f"{norm}, {pipeline}"] = fit_on(model, make)
    times = time_interleaved(steppers, steps, args.repeats, args.warmup)
    shape = f"{name}, {args.batch_size}x32x32x3"
    rows = rows_of("input", shape, times, args.batch_size, steps,
                   "batchnorm, resident")
    steps_per_epoch = -(-len(images) // args.batch_size)
    for row in rows:
        norm, pipeline = row["variant"].split(", ")
        resident_times = times[f"{norm}, resident"]
        # The share of a step spent waiting for data, against the same
        # norm's steps on resident batches of the same round.
        row["wait_share"] = round(1 - statistics.median(
            [r / v for r, v in zip(resident_times, times[row["variant"]])]), 4)
        row["epoch_s"] = round(row["ms_per_step"] * steps_per_epoch / 1000, 3)
        row["steps_per_execution"] = per_execution
    return rows


def bench_loop(keras, args, jit, rng, environment):
    """train.py's two loops on JAX (see the module's docstring): each repeat
    an "epoch" of `steps` steps of augmented CIFAR-10 batches."""
    from types import SimpleNamespace

    from experiment import compiled_epoch
    from experiment import device_data
    from experiment import sampling
    from experiment.preprocessing import channel_stats

    if environment["backend"] != "jax":
        raise UsageError("--level loop compares train.py's JAX loops; run "
                         "it with --backend jax")
    steps = model_steps(args, environment)
    images, labels, source = training_images(args, rng)
    images = images[:steps * args.batch_size]  # an epoch of `steps` steps
    labels = labels[:steps * args.batch_size]
    arrays = SimpleNamespace(x_train=images, y_train=labels,
                             **dict(zip(("mean", "std"),
                                        channel_stats(images))))
    config = {"batch_size": args.batch_size, "seed": 0, "augment": True,
              "classes_per_batch": None, "sampling": "iid",
              "virtual_batch_size": None, "steps_per_execution": steps,
              "eval_batch_size": args.batch_size}
    name = f"WRN-{args.depth}-{args.width}"
    print(f"loop level, {name}, epochs of {steps} steps, data: {source}",
          flush=True)
    epoch = [0]

    def per_step(model):
        on_device = device_data.DeviceTrainSet(
            images, labels, arrays.mean, arrays.std, augmented=True)

        def run(n):
            for _ in range(-(-n // steps)):
                epoch[0] += 1
                model.fit(on_device.train_batches(
                    args.batch_size, sampling.epoch_rng(0, epoch[0])),
                    steps_per_epoch=steps, epochs=1, verbose=0,
                    shuffle=False)
                keras.ops.convert_to_numpy(model.optimizer.iterations)
        return run

    def compiled(model):
        epochs = compiled_epoch.CompiledEpochs(keras, model, config, arrays,
                                               steps)
        epochs.progress = False

        def run(n):
            for _ in range(-(-n // steps)):
                epoch[0] += 1
                epochs.train_epoch(epoch[0])
        return run

    steppers = {}
    for norm in ("batchnorm", "renorm"):
        for loop, make in (("per-step", per_step), ("compiled", compiled)):
            model, _ = wrn_model(keras, norm, args.depth, args.width)
            model.compile(optimizer=keras.optimizers.Adam(1e-3),
                          loss="sparse_categorical_crossentropy",
                          metrics=["accuracy"], jit_compile=jit)
            model.optimizer.build(model.trainable_variables)
            x, y = wrn_batch(args, rng)
            model._symbolic_build(data_batch=(x, y, None))
            steppers[f"{norm}, {loop}"] = make(model)
    times = time_interleaved(steppers, steps, args.repeats,
                             max(args.warmup, steps))
    rows = rows_of("loop", f"{name}, {args.batch_size}x32x32x3", times,
                   args.batch_size, steps, "batchnorm, per-step")
    for row in rows:
        norm, loop = row["variant"].split(", ")
        baseline = times[f"batchnorm, {loop}"]
        row["norm_ratio"] = round(statistics.median(
            [v / b for v, b in zip(times[row["variant"]], baseline)]), 4)
    return rows


def training_images(args, rng):
    """CIFAR-10's training images and labels (--data-dir, CIFAR10_DIR or the
    copy in ../shared/data), else random ones of the same shape, and where
    they came from."""
    import numpy as np

    from experiment import cifar10

    data_dir = args.data_dir
    beside = ROOT.parent / "shared" / "data" / "cifar-10-batches-py"
    if data_dir is None and not os.environ.get("CIFAR10_DIR") and (
            beside / "data_batch_1").is_file():
        data_dir = beside
    try:
        data = cifar10.load(data_dir)
        return data.x_train, data.y_train, data.source
    except cifar10.DataError:
        images = rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, 50000).astype(np.int32)
        return images, labels, "random uint8 images (CIFAR-10 not found)"


def cycle(batches):
    while True:
        yield from batches


# ---------------------------------------------------------------- files
def describe(environment, jit, args, argv):
    """The run's record: train.py's `environment`, threads, settings, and
    the command (`argv`, bench.py's arguments)."""
    threads = {"cpu_count": os.cpu_count(),
               "cpus": sorted(os.sched_getaffinity(0))}
    backend = environment["backend"]
    if backend == "torch":
        import torch

        threads["torch_threads"] = torch.get_num_threads()
    elif backend == "tensorflow":
        import tensorflow as tf

        threads["tf_intra_op"] = tf.config.threading.get_intra_op_parallelism_threads()
        threads["tf_inter_op"] = tf.config.threading.get_inter_op_parallelism_threads()
    if tf_keras() is not None and backend == "tensorflow":
        environment["versions"]["tf_keras"] = tf_keras().__version__
    return dict(environment, threads=threads, jit_compile=jit,
                batch_size=args.batch_size, dtype_policy=args.dtype_policy,
                date=datetime.datetime.now(datetime.timezone.utc)
                .isoformat(timespec="seconds"),
                processes=1,
                command=" ".join(["python", "benchmarks/bench.py", *argv]))


def write_results(results_dir, environment, rows):
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{environment['backend']}-{environment['device_type']}"
    if (environment["backend"], environment["jit_compile"]) == (
            "tensorflow", True):
        stem += "-xla"  # TensorFlow with and without XLA side by side
    record = dict(environment, rows=rows)
    json_path = results_dir / f"{stem}.json"
    if json_path.is_file():  # keep the levels this run did not measure
        old = json.loads(json_path.read_text())
        levels = {row["level"] for row in rows}
        record["rows"] = [r for r in old.get("rows", [])
                          if r["level"] not in levels] + rows
        record["earlier"] = {k: old[k] for k in ("date", "command")
                             if k in old}
    runfiles.write_file(json_path,
                        (json.dumps(record, indent=1) + "\n").encode())
    keys = list(COLUMNS) + ["wait_share", "epoch_s", "steps_per_execution",
                            "norm_ratio"]
    rows = [dict(row, backend=environment["backend"],
                 device=environment["device"]) for row in record["rows"]]
    runfiles.write_file(results_dir / f"{stem}.csv", runfiles.csv_text(
        keys + ["backend", "device"], rows).encode())
    return json_path


def summary(results_dir):
    """Markdown tables of every results file."""
    parts = []
    for path in sorted(results_dir.glob("*.json")):
        record = json.loads(path.read_text())
        versions = record.get("versions", {})
        framework = {"tensorflow": "tensorflow", "jax": "jax",
                     "torch": "torch"}[record["backend"]]
        parts.append(
            f"**{record['backend']}** on {record['device']} (Keras "
            f"{versions.get('keras')}, {framework} "
            f"{versions.get(framework)}, jit_compile={record['jit_compile']}, "
            f"{record.get('dtype_policy', 'float32')}, "
            f"threads {record['threads']}"
            + (f", rounds of {record['processes']} processes"
               if record.get("processes", 1) > 1 else "")
            + f"; {record['date']})\n")
        header = ("level", "shape", "variant", "ms/step (median)",
                  "min-max", "images/s", "ratio")
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---" for _ in header) + "|"]
        for row in record["rows"]:
            ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
            if row["level"] == "input" and "resident" not in row["variant"]:
                ratio += (f" (waiting {100 * row['wait_share']:.1f}%; "
                          f"{row['epoch_s']:.1f} s per epoch)")
            if row["level"] == "loop" and row["variant"].startswith("renorm"):
                ratio += f" (renorm / batchnorm {row['norm_ratio']:.3f})"
            lines.append("| " + " | ".join([
                row["level"], row["shape"], row["variant"],
                f"{row['ms_per_step']:.1f}",
                f"{row['ms_min']:.1f}-{row['ms_max']:.1f}",
                f"{row['images_per_s']:.1f}", ratio]) + " |")
        parts.append("\n".join(lines) + "\n")
    note = ("Ratio: the median over the repeats of the time per step over that "
            "of the same repeat's `batchnorm` (layer and model levels), "
            "`batchnorm, resident` (input level; waiting: "
            "the share of a step spent on input, against the same norm on "
            "resident batches; s per epoch: ms per step times the steps of "
            "an epoch of 50,000 images), the same norm with "
            "`jit_compile=off` (jit level), `batchnorm, per-step` (loop "
            "level; renorm / batchnorm: in the same loop and repeat); "
            "measured interleaved in one "
            "process, or with the rounds of several pooled where the header "
            "says so. Written by `benchmarks/bench.py` from "
            "`benchmarks/results/*.json`.\n")
    return "# Benchmarks\n\n" + "\n".join(parts) + "\n" + note


def update_readme(path, text):
    try:
        runfiles.replace_block(path, README_BEGIN, README_END,
                               text.split("\n", 2)[2])  # less the title
    except ValueError as error:
        raise UsageError(error) from None


def write_summary(args):
    """summary.md from every results file (and README's block with
    --readme); returns its text."""
    text = summary(args.results_dir)
    runfiles.write_file(args.results_dir / "summary.md", text.encode())
    if args.readme:
        update_readme(args.readme, text)
    return text


def print_rows(rows):
    width = max([len("variant")] + [len(row["variant"]) for row in rows])
    print(f"{'level':6} {'shape':26} {'variant':{width}} {'ms/step':>9} "
          f"{'min-max':>15} {'images/s':>9} {'ratio':>6}")
    for row in rows:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
        print(f"{row['level']:6} {row['shape']:26} {row['variant']:{width}} "
              f"{row['ms_per_step']:9.1f} "
              f"{row['ms_min']:7.1f}-{row['ms_max']:<7.1f} "
              f"{row['images_per_s']:9.1f} {ratio:>6}")


def measure(args, argv):
    """Runs the levels of `args` (parsed from `argv`) in this process:
    (record, rows)."""
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    import numpy as np

    with quiet_startup():  # TensorFlow's start-up lines hidden
        import keras

    if args.backend and keras.backend.backend() != args.backend:
        raise UsageError(f"--backend {args.backend}: Keras is already "
                         f"running on {keras.backend.backend()}")
    environment = runtime.describe_environment(keras)
    jit = runtime.jit_compile(args.jit_compile, environment)
    variants = available_variants(keras, args.variants)
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(args.dtype_policy)
    rng = np.random.default_rng(0)
    print(f"{PROG}: backend {environment['backend']}, "
          f"{environment['device']}, jit_compile={jit}", flush=True)
    rows = []
    try:
        if "layer" in args.level:
            rows += bench_layer(keras, args, variants, jit, rng,
                                environment)
        if "matrix" in args.level:
            rows += layer_matrix(
                args.channels[0], args.batch_sizes, setups=args.setups,
                variants=variants, steps=layer_steps(args, environment),
                repeats=args.repeats, warmup=args.warmup, jit=jit)
        if "model" in args.level:
            rows += bench_model(keras, args, variants, jit, rng,
                                environment)
        if "input" in args.level:
            rows += bench_input(keras, args, jit, rng, environment)
        if "jit" in args.level:
            rows += bench_jit(keras, args, rng, environment)
        if "devices" in args.level:
            rows += bench_devices(keras, args, rng, environment)
        if "loop" in args.level:
            rows += bench_loop(keras, args, jit, rng, environment)
    finally:
        keras.config.set_dtype_policy(policy)
    return describe(environment, jit, args, argv), rows


def measure_in_processes(args, argv):
    """Runs this command in `args.processes` fresh processes, one after
    another (each compiles and warms up anew, so that what one process's
    memory and code placement do to a ratio is averaged out), and pools
    their rounds: (record, rows)."""
    import subprocess
    import tempfile

    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.processes):
            output = Path(folder) / f"{index}.json"
            print(f"{PROG}: process {index + 1} of {args.processes}",
                  flush=True)
            code = subprocess.call([sys.executable, str(Path(__file__)),
                                    *argv, "--worker-output", str(output)])
            if code != 0:
                raise WorkerFailed(code)
            runs.append(json.loads(output.read_text()))
    record = dict(runs[0]["record"], processes=args.processes,
                  command=" ".join(["python", "benchmarks/bench.py", *argv]))
    return record, pooled_rows([run["rows"] for run in runs])


class WorkerFailed(Exception):
    """A process of --processes ended with a non-zero code (it said why)."""


def pin(cpus):
    """Restricts this process, and the threads its frameworks start, to
    `cpus` (before any framework is imported: thread pools are sized by
    the CPUs a process may use); returns the CPUs it had."""
    allowed = os.sched_getaffinity(0)
    outside = sorted(set(cpus) - allowed)
    if outside:
        raise UsageError(f"--cpus {' '.join(map(str, outside))}: not among "
                         f"this process's CPUs "
                         f"({' '.join(map(str, sorted(allowed)))})")
    os.sched_setaffinity(0, set(cpus))
    return allowed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    pinned_from = None
    try:
        args = build_parser().parse_args(argv)
        if args.summary:
            print(write_summary(args), end="")
            return 0
        if args.processes > 1 and "input" in args.level:
            raise UsageError("--processes pools the rounds of the layer, "
                             "matrix, model, jit and devices levels; run "
                             "the input level in one process")
        if args.cpus:
            pinned_from = pin(args.cpus)
        if args.worker_output:
            record, rows = measure(args, argv)
            args.worker_output.write_text(json.dumps(
                {"record": record, "rows": rows}))
            return 0
        if args.processes > 1:
            record, rows = measure_in_processes(args, argv)
        else:
            record, rows = measure(args, argv)
        path = write_results(args.results_dir, record, rows)
        print_rows(rows)
        write_summary(args)
        print(f"results: {path}, {path.with_suffix('.csv')}, "
              f"{args.results_dir / 'summary.md'}")
        return 0
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except WorkerFailed as failed:
        print(f"{PROG}: error: a measuring process ended with code "
              f"{failed.args[0]}; nothing written", file=sys.stderr)
        return 130 if failed.args[0] == 130 else 1
    except runfiles.WriteError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    finally:
        if pinned_from:  # a caller of main() keeps its own CPUs
            os.sched_setaffinity(0, pinned_from)


if __name__ == "__main__":
    sys.exit(main())
