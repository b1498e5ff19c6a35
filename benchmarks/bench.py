#!/usr/bin/env python3
"""Speed of BatchRenormalization against BatchNormalization, side by side.

  python benchmarks/bench.py                       # layer + model level, this backend
  python benchmarks/bench.py --backend jax         # another Keras backend
  python benchmarks/bench.py --level input jit     # input pipeline; jit_compile on / off
  python benchmarks/bench.py --summary --readme docs/speed.md   # tables only

Levels (--level; default layer model): layer (a norm layer after a
trainable scale, per --channels), matrix (the layer per --batch-sizes and
--setups, renorm's bounds moving `@ramp` or `@fixed`), model (WRN training
steps), input (train.py's loop fed by its `host` and `device` pipelines
against `resident` batches), jit (jit_compile off and on), devices (JAX:
data parallel), loop (JAX: Keras's loop against the compiled epoch).

Each variant is built and warmed up, then the repeats run interleaved; a
ratio is the median over the repeats of the two times of the same repeat.
Each run writes RESULTS/BACKEND-DEVICE.json and .csv (-xla: TensorFlow with
jit_compile on; a rerun of a level replaces its rows), then
RESULTS/summary.md from every results file, and with --readme FILE the
block of FILE between its `bench.md begins` and `bench.md ends` comments.
Variants and method: docs/speed.md.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiment import cli, runfiles, runtime  # noqa: E402 (after the path)
from experiment.startup import quiet_startup  # noqa: E402

PROG = "bench.py"
LEVELS = ("layer", "matrix", "model", "input", "jit", "devices", "loop")
NORM_VARIANTS = ("batchnorm", "renorm", "renorm-portable", "renorm-groups4",
                 "keras-renorm", "tf.keras-batchnorm", "tf.keras-renorm",
                 "renorm-tracked")
ON_REQUEST = ("renorm-tracked",)  # only when --variants names it
# The renorm variants' layer arguments (groups4: the paper's micro-batches).
RENORM_OPTIONS = {"renorm-portable": dict(fused=False),
                  "renorm-tracked": dict(track_corrections=True),
                  "renorm-groups4": dict(virtual_batch_size=4)}
RESULTS_DIR = ROOT / "benchmarks" / "results"
README_BEGIN = "<!-- bench.md begins -->"
README_END = "<!-- bench.md ends -->"
COLUMNS = ("level", "shape", "variant", "ms_per_step", "ms_min", "ms_max",
           "images_per_s", "ratio", "repeats", "steps")
EXTRA_COLUMNS = ("wait_share", "epoch_s", "steps_per_execution", "norm_ratio")
# The matrix level: name -> (after a trainable scale, so that the input
# gradient is computed; norm layers in a row; a ReLU after each).
LAYER_SETUPS = {
    "input": (False, 1, False),
    "input-relu": (False, 1, True),
    "scale": (True, 1, False),
    "stack4-relu": (True, 4, True),
}
LAYER_BATCH_SIZES = (16, 64, 256)
LAYER_SCHEDULES = {
    "ramp": dict(warmup_steps=0, r_max_steps=10**6, d_max_steps=10**6),
    "fixed": dict(warmup_steps=0, r_max_steps=0, d_max_steps=0),
}


def build_parser():
    parser = cli.script_parser(PROG, __doc__)
    add = parser.add_argument
    add("--backend", choices=("tensorflow", "jax", "torch"),
        help="Keras backend (default: KERAS_BACKEND, or Keras's default)")
    add("--level", nargs="+", choices=LEVELS, default=["layer", "model"],
        metavar="LEVEL", help=f"{', '.join(LEVELS)} (default: layer model)")
    add("--variants", nargs="+", choices=NORM_VARIANTS, metavar="VARIANT",
        help="normalizations to compare (default: all this backend has)")
    add("--batch-size", type=cli.positive_int, default=128)
    add("--batch-sizes", type=cli.positive_int, nargs="+", metavar="B",
        default=list(LAYER_BATCH_SIZES), help="matrix level (default: "
        + " ".join(map(str, LAYER_BATCH_SIZES)) + ")")
    add("--setups", nargs="+", choices=tuple(LAYER_SETUPS), metavar="SETUP",
        default=list(LAYER_SETUPS), help="matrix level: where the layer sits "
        "(default: " + " ".join(LAYER_SETUPS) + ")")
    add("--channels", type=cli.positive_int, nargs="+", default=[64, 128, 256],
        help="layer level: C of (B, 32, 32, C) (default: 64 128 256)")
    add("--depth", type=cli.positive_int, default=16,
        help="WRN depth (default 16)")
    add("--width", type=cli.positive_int, default=4,
        help="WRN width (default 4)")
    add("--steps", type=cli.positive_int, help="training steps per timed "
        "repeat (default on a CPU: 3 for a layer, 2 for a model; GPU: 50)")
    add("--repeats", type=cli.positive_int, default=5,
        help="timed repeats of each variant (default 5)")
    add("--warmup", type=cli.positive_int, default=2,
        help="untimed steps per variant first (default 2)")
    add("--steps-per-execution", type=cli.steps_or_auto, default="auto",
        metavar="N", help="input level: as train.py's (default auto)")
    add("--dtype-policy", default="float32",
        choices=("float32", "mixed_float16", "mixed_bfloat16"),
        help="Keras dtype policy of every model (default float32)")
    add("--jit-compile", choices=("auto", "on", "off"), default="auto",
        help="as train.py's (default auto)")
    add("--data-dir", type=Path, help="CIFAR-10 for the input and loop "
        "levels (default: CIFAR10_DIR, ../shared/data, else random images)")
    add("--cpus", type=cli.nonnegative_int, nargs="+", metavar="CPU",
        help="run on these CPUs only, the framework's threads too (default: "
        "every CPU this process may use)")
    add("--processes", type=cli.positive_int, default=1, metavar="N",
        help="measure in N fresh processes, one after another, and pool "
        "their rounds (default 1); not for the input level")
    add("--worker-output", type=Path, help=argparse.SUPPRESS)
    add("--results-dir", type=Path, default=RESULTS_DIR)
    add("--summary", action="store_true",
        help="only rewrite summary.md (and --readme) from the results files")
    add("--readme", type=Path, metavar="FILE",
        help="also replace the bench.md block of FILE (docs/speed.md)")
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


def median_ratio(values, baseline):
    """The median over the rounds of value / baseline of the same round."""
    return round(statistics.median(
        [v / b for v, b in zip(values, baseline)]), 4)


def rows_of(level, shape, times, batch_size, steps, baseline):
    """A row per variant: median and spread of its seconds per step, and its
    ratio to `baseline` within each round (so that the machine's drift
    cancels out)."""
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({
            "level": level, "shape": shape, "variant": name,
            "ms_per_step": round(1000 * median, 3),
            "ms_min": round(1000 * min(values), 3),
            "ms_max": round(1000 * max(values), 3),
            "images_per_s": round(batch_size / median, 2),
            "ratio": (median_ratio(values, times[baseline])
                      if baseline in times else None),
            "repeats": len(values), "steps": steps,
            "ms_repeats": [round(1000 * v, 3) for v in values],
            "baseline": baseline, "batch_size": batch_size})
    return rows


def pooled_rows(runs):
    """The rows of several processes' runs (a list of row lists) as one
    run's: each (level, shape)'s rounds joined in process order, so that
    every round keeps its own baseline."""
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


# ---------------------------------------------------------------- models
def available_variants(requested):
    import keras

    import batch_renorm

    names = ["batchnorm", "renorm"]
    if batch_renorm.has_fast_path():
        names.append("renorm-portable")
    names += ["renorm-groups4", "keras-renorm"]
    if keras.backend.backend() == "tensorflow" and tf_keras() is not None:
        names += ["tf.keras-batchnorm", "tf.keras-renorm"]
    if not requested:
        return names
    names += list(ON_REQUEST)
    missing = [v for v in requested if v not in names]
    if missing:
        raise cli.UsageError(f"variant(s) {', '.join(missing)} not available "
                             f"on this backend (available: {', '.join(names)})")
    return [v for v in names if v in requested]


def tf_keras():
    try:
        with quiet_startup():  # it imports TensorFlow, on any backend
            import tf_keras as module
    except ImportError:
        return None
    return module


def norm_factory(variant):
    """A function(**layer kwargs) -> normalization layer, and the Keras API
    (keras, or tf_keras for the anchors) that builds the model around it."""
    import keras

    from models.norms import make_norm

    if not variant.startswith("tf.keras-"):
        norm = "renorm" if variant in RENORM_OPTIONS else variant
        options = RENORM_OPTIONS.get(variant, {})
        return (lambda **kwargs: make_norm(norm, **options, **kwargs)), keras
    api = tf_keras()
    extra = dict(renorm=True, renorm_momentum=0.99, renorm_clipping={
        "rmin": 1 / 3, "rmax": 3.0, "dmax": 5.0}) if variant.endswith(
            "renorm") else {}
    # fused=None: tf.keras fuses where it can (not with renorm).
    return (lambda **kwargs: api.layers.BatchNormalization(
        momentum=0.99, epsilon=1e-3, **extra, **kwargs)), api


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


def layer_model(variant, shape, setup="scale", schedule=None):
    """Normalization layers on `shape` as `LAYER_SETUPS[setup]` places them;
    `schedule`: renorm's arguments (`LAYER_SCHEDULES`), renorm only."""
    make, api = norm_factory(variant)
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


def layer_rows(level, label, shape, variants, setup, schedules, *,
               steps, repeats, warmup, jit, rng):
    """The rows of `variants` on a random batch of `shape`, each renorm
    variant once per schedule (`renorm@ramp`, ...; None: as built)."""
    import keras

    x, y = map(keras.ops.convert_to_tensor, (
        rng.standard_normal(shape, dtype="float32") * 2 + 0.5,
        rng.standard_normal(shape, dtype="float32")))
    print(f"{level}, {label}:", flush=True)
    steppers = {}
    for variant in variants:
        for regime in schedules if variant.startswith("renorm") else [None]:
            model, api = layer_model(variant, shape, setup,
                                     LAYER_SCHEDULES.get(regime))
            compile_model(model, api, jit, loss="mse")
            name = variant + (f"@{regime}" if regime else "")
            steppers[name] = stepper(model, api, x, y)
    times = time_interleaved(steppers, steps, repeats, warmup)
    return rows_of(level, label, times, shape[0], steps, "batchnorm")


def wrn_model(variant, depth, width):
    from models import wide_resnet

    make, api = norm_factory(variant)
    return wide_resnet(depth, width, norm=make, keras_api=api), api


def steps_of(args, environment, on_cpu):
    """--steps, else `on_cpu` on a CPU and 50 elsewhere."""
    return args.steps or (on_cpu if environment["device_type"] == "cpu"
                          else 50)


def wrn_name(args):
    return f"WRN-{args.depth}-{args.width}"


def wrn_batch(args, rng):
    x = rng.standard_normal((args.batch_size, 32, 32, 3), dtype="float32")
    y = rng.integers(0, 10, args.batch_size).astype("int32")
    return x, y


def wrn_times(level, args, steps, steppers, baseline, warmup=None):
    """Times `steppers` (WRN steps on batches of --batch-size): their rows
    and seconds."""
    times = time_interleaved(steppers, steps, args.repeats,
                             warmup or args.warmup)
    return rows_of(level, f"{wrn_name(args)}, {args.batch_size}x32x32x3",
                   times, args.batch_size, steps, baseline), times


# ---------------------------------------------------------------- levels
def bench_layer(args, variants, jit, rng, environment):
    return [row for channels in args.channels for row in layer_rows("layer", f"{args.batch_size}x32x32x{channels}",
        (args.batch_size, 32, 32, channels), variants, "scale", [None],
        steps=steps_of(args, environment, 3), repeats=args.repeats,
        warmup=args.warmup, jit=jit, rng=rng)]


def bench_matrix(args, variants, jit, rng, environment):
    """Every batch size, setup and renorm schedule on (B, 32, 32, C) for
    the first --channels C."""
    c = args.channels[0]
    return [row for b in args.batch_sizes for setup in args.setups
            for row in layer_rows("matrix", f"{b}x32x32x{c} {setup}", (b, 32, 32, c),
                variants, setup, tuple(LAYER_SCHEDULES),
                steps=steps_of(args, environment, 3), repeats=args.repeats,
                warmup=args.warmup, jit=jit, rng=rng)]


def wrn_steppers(args, batch, settings):
    """name -> stepper of a WRN for each name -> (variant, jit_compile) of
    `settings`, on `batch`."""
    import keras

    x, y = map(keras.ops.convert_to_tensor, batch)
    steppers = {}
    for name, (variant, jit) in settings.items():
        model, api = wrn_model(variant, args.depth, args.width)
        compile_model(model, api, jit)
        steppers[name] = stepper(model, api, x, y)
    return steppers


def bench_model(args, variants, jit, rng, environment):
    print(f"model level, {wrn_name(args)}, batch {args.batch_size}:",
          flush=True)
    steppers = wrn_steppers(args, wrn_batch(args, rng),
                            {variant: (variant, jit) for variant in variants})
    return wrn_times("model", args, steps_of(args, environment, 2), steppers,
                     "batchnorm")[0]


def bench_jit(args, variants, jit, rng, environment):
    """WRN steps of batchnorm and renorm with jit_compile off and on; each
    ratio is to the same norm's jit_compile=off."""
    batch, rows = wrn_batch(args, rng), []
    for norm in ("batchnorm", "renorm"):
        print(f"jit_compile, {wrn_name(args)} with {norm}:", flush=True)
        steppers = wrn_steppers(args, batch, {
            f"{norm}, jit_compile={setting}": (norm, setting == "on")
            for setting in ("off", "on")})
        rows += wrn_times("jit", args, steps_of(args, environment, 2),
                          steppers, f"{norm}, jit_compile=off")[0]
    return rows


def bench_devices(args, variants, jit, rng, environment):
    """JAX: WRN steps on one device, data parallel on every device (the
    global batch's moments), and renorm with per-device statistics
    (virtual_batch_size); ratios to the same norm on one device."""
    import keras

    if keras.backend.backend() != "jax":
        raise cli.UsageError("--level devices needs the jax backend (Keras's "
                             "distribution API)")
    devices = keras.distribution.list_devices()
    if len(devices) < 2:
        raise cli.UsageError(
            "--level devices needs several devices; JAX sees one (on a CPU: "
            "XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    if args.batch_size % len(devices):
        raise cli.UsageError(f"--batch-size {args.batch_size} does not split "
                             f"over {len(devices)} devices")
    from models import wide_resnet
    from models.norms import make_norm

    # NumPy batches for all: each step moves (and under DataParallel
    # splits) its batch, the same work for every setting.
    x, y = wrn_batch(args, rng)
    parallel = keras.distribution.DataParallel(devices=devices)
    many = f"{len(devices)} devices"
    rows = []
    for norm in ("batchnorm", "renorm"):
        print(f"devices, {wrn_name(args)} with {norm}:", flush=True)
        settings = {f"{norm}, 1 device": (None, {}),
                    f"{norm}, {many}": (parallel, {})}
        if norm == "renorm":
            settings[f"{norm}, {many}, per-device statistics"] = (
                parallel,
                dict(virtual_batch_size=args.batch_size // len(devices)))
        steppers = {}
        for label, (distribution, extra) in settings.items():
            def make_stepper(extra=extra, norm=norm):
                model = wide_resnet(args.depth, args.width, norm=lambda **kw:
                                    make_norm(norm, **kw, **extra))
                compile_model(model, keras, True)
                return stepper(model, keras, x, y)
            steppers[label] = in_distribution(distribution, make_stepper)
        rows += wrn_times("devices", args, steps_of(args, environment, 2),
                          steppers, f"{norm}, 1 device")[0]
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


def fitter(model, make_batches, epoch, steps_per_fit=None):
    """A stepper of model.fit on `make_batches()`, a new epoch's generator
    (`epoch` counts them), in fits of `steps_per_fit` steps (default: all)."""
    import keras

    def run(n):
        per_fit = steps_per_fit or n
        for _ in range(-(-n // per_fit)):
            epoch[0] += 1
            model.fit(make_batches(), steps_per_epoch=per_fit, epochs=1,
                      verbose=0, shuffle=False)
            keras.ops.convert_to_numpy(model.optimizer.iterations)
    return run


def bench_input(args, variants, jit, rng, environment):
    """train.py's loop (model.fit on an epoch's generator) for batchnorm
    and renorm, fed by its pipelines (`host`: NumPy; `device`: keras.ops on
    the device; both augmented) and by batches made beforehand
    (`resident`: no input work at all)."""
    import keras

    from experiment import device_data, sampling
    from experiment.preprocessing import channel_stats

    images, labels, source = training_images(args, rng)
    mean, std = channel_stats(images)
    steps = steps_of(args, environment, 2)
    per_execution = runtime.resolve_steps_per_execution(
        args.steps_per_execution, environment, steps)
    print(f"input level, {wrn_name(args)}, {steps} steps per repeat, "
          f"steps_per_execution={per_execution}, data: {source}", flush=True)
    on_device = device_data.DeviceTrainSet(images, labels, mean, std,
                                           augmented=True)
    two = slice(0, 2 * args.batch_size)
    resident = [tuple(map(keras.ops.convert_to_tensor, batch))
                for batch in sampling.train_batches(
                    images[two], labels[two], args.batch_size, mean, std, rng)]
    epoch = [0]
    pipelines = {
        "resident": lambda: cycle(resident),
        "host": lambda: sampling.train_batches(
            images, labels, args.batch_size, mean, std,
            sampling.epoch_rng(0, epoch[0]), augmented=True),
        "device": lambda: on_device.train_batches(
            args.batch_size, sampling.epoch_rng(0, epoch[0])),
    }
    steppers = {}
    for norm in ("batchnorm", "renorm"):
        model, _ = wrn_model(norm, args.depth, args.width)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=1e-3),
                      loss="sparse_categorical_crossentropy",
                      jit_compile=jit, steps_per_execution=per_execution)
        for pipeline, make in pipelines.items():
            steppers[f"{norm}, {pipeline}"] = fitter(model, make, epoch)
    rows, times = wrn_times("input", args, steps, steppers,
                            "batchnorm, resident")
    steps_per_epoch = -(-len(images) // args.batch_size)
    for row in rows:
        # The share of a step spent waiting for data: against the same
        # norm's steps on resident batches of the same round.
        resident_times = times[row["variant"].split(", ")[0] + ", resident"]
        row["wait_share"] = round(
            1 - median_ratio(resident_times, times[row["variant"]]), 4)
        row["epoch_s"] = round(row["ms_per_step"] * steps_per_epoch / 1000, 3)
        row["steps_per_execution"] = per_execution
    return rows


def bench_loop(args, variants, jit, rng, environment):
    """train.py's two JAX loops, Keras's (`per-step`) and the compiled
    epoch (`compiled`), with Adam and accuracy as train.py; a repeat: an
    epoch of --steps augmented batches kept on the device. `norm_ratio`: to
    batchnorm in the same loop and round."""
    import keras
    from experiment import compiled_epoch, device_data, sampling
    from experiment.preprocessing import channel_stats

    if environment["backend"] != "jax":
        raise cli.UsageError("--level loop compares train.py's JAX loops; "
                             "run it with --backend jax")
    steps = steps_of(args, environment, 2)
    images, labels, source = training_images(args, rng)
    arrays = SimpleNamespace(x_train=images[:steps * args.batch_size],
                             y_train=labels[:steps * args.batch_size])
    arrays.mean, arrays.std = channel_stats(arrays.x_train)
    config = {"batch_size": args.batch_size, "seed": 0, "augment": True,
              "classes_per_batch": None, "sampling": "iid",
              "virtual_batch_size": None, "steps_per_execution": steps,
              "eval_batch_size": args.batch_size}
    print(f"loop level, {wrn_name(args)}, epochs of {steps} steps, data: "
          f"{source}", flush=True)
    epoch = [0]

    def per_step(model):
        on_device = device_data.DeviceTrainSet(
            arrays.x_train, arrays.y_train, arrays.mean, arrays.std,
            augmented=True)
        return fitter(model, lambda: on_device.train_batches(
            args.batch_size, sampling.epoch_rng(0, epoch[0])), epoch, steps)

    def compiled(model):
        epochs = compiled_epoch.CompiledEpochs(model, config, arrays,
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
            model, _ = wrn_model(norm, args.depth, args.width)
            model.compile(optimizer=keras.optimizers.Adam(1e-3),
                          loss="sparse_categorical_crossentropy",
                          metrics=["accuracy"], jit_compile=jit)
            model.optimizer.build(model.trainable_variables)
            model._symbolic_build(data_batch=(*wrn_batch(args, rng), None))
            steppers[f"{norm}, {loop}"] = make(model)
    rows, times = wrn_times("loop", args, steps, steppers,
                            "batchnorm, per-step", max(args.warmup, steps))
    for row in rows:
        loop = row["variant"].split(", ")[1]
        row["norm_ratio"] = median_ratio(times[row["variant"]],
                                         times[f"batchnorm, {loop}"])
    return rows


BENCHES = {"layer": bench_layer, "matrix": bench_matrix, "model": bench_model,
           "input": bench_input, "jit": bench_jit, "devices": bench_devices,
           "loop": bench_loop}


def training_images(args, rng):
    """CIFAR-10's training images and labels (--data-dir, CIFAR10_DIR,
    ../shared/data), else random ones, and where they came from."""
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
    """The run's record: `environment`, threads, settings, the command."""
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
        if tf_keras() is not None:
            environment["versions"]["tf_keras"] = tf_keras().__version__
    return dict(environment, threads=threads, jit_compile=jit,
                batch_size=args.batch_size, dtype_policy=args.dtype_policy,
                date=datetime.datetime.now(datetime.timezone.utc)
                .isoformat(timespec="seconds"),
                processes=1, command=command(argv))


def command(argv):
    return " ".join(["python", "benchmarks/bench.py", *argv])


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
    rows = [dict(row, backend=environment["backend"],
                 device=environment["device"]) for row in record["rows"]]
    runfiles.write_file(results_dir / f"{stem}.csv", runfiles.csv_text(
        [*COLUMNS, *EXTRA_COLUMNS, "backend", "device"], rows).encode())
    return json_path


def ratio_text(row):
    """A row's ratio cell, with the input level's wait, the loop level's
    renorm / batchnorm."""
    text = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
    if row["level"] == "input" and "resident" not in row["variant"]:
        text += (f" (waiting {100 * row['wait_share']:.1f}%; "
                 f"{row['epoch_s']:.1f} s per epoch)")
    if row["level"] == "loop" and row["variant"].startswith("renorm"):
        text += f" (renorm / batchnorm {row['norm_ratio']:.3f})"
    return text


SUMMARY_NOTE = (
    "Ratio: the median over the repeats of the time per step over that of the "
    "same repeat's `batchnorm` (layer and model levels), `batchnorm, "
    "resident` (input level; waiting: the share of a step spent on input, "
    "against the same norm on resident batches; s per epoch: ms per step "
    "times the steps of an epoch of 50,000 images), the same norm with "
    "`jit_compile=off` (jit level), `batchnorm, per-step` (loop level; "
    "renorm / batchnorm: in the same loop and repeat); measured interleaved "
    "in one process, or with the rounds of several pooled where the header "
    "says so. Written by `benchmarks/bench.py` from "
    "`benchmarks/results/*.json`.\n")


def table(rows):
    """The markdown table of `rows`."""
    header = ("level", "shape", "variant", "ms/step (median)", "min-max",
              "images/s", "ratio")
    return "\n".join(
        ["| " + " | ".join(header) + " |",
         "|" + "|".join("---" for _ in header) + "|"]
        + ["| " + " | ".join([
            row["level"], row["shape"], row["variant"],
            f"{row['ms_per_step']:.1f}",
            f"{row['ms_min']:.1f}-{row['ms_max']:.1f}",
            f"{row['images_per_s']:.1f}", ratio_text(row)]) + " |"
           for row in rows]) + "\n"


def summary(results_dir):
    """Markdown tables of every results file."""
    parts = []
    for path in sorted(results_dir.glob("*.json")):
        record = json.loads(path.read_text())
        versions, backend = record.get("versions", {}), record["backend"]
        parts.append(
            f"**{backend}** on {record['device']} (Keras "
            f"{versions.get('keras')}, {backend} {versions.get(backend)}, "
            f"jit_compile={record['jit_compile']}, "
            f"{record.get('dtype_policy', 'float32')}, "
            f"threads {record['threads']}"
            + (f", rounds of {record['processes']} processes"
               if record.get("processes", 1) > 1 else "")
            + f"; {record['date']})\n")
        parts.append(table(record["rows"]))
    return "# Benchmarks\n\n" + "\n".join(parts) + "\n" + SUMMARY_NOTE


def write_summary(args):
    """summary.md (and --readme's block) from every results file."""
    text = summary(args.results_dir)
    runfiles.write_file(args.results_dir / "summary.md", text.encode())
    if args.readme:
        try:
            runfiles.replace_block(args.readme, README_BEGIN, README_END,
                                   text.split("\n", 2)[2])  # less the title
        except ValueError as error:
            raise cli.UsageError(error) from None
    return text


# ---------------------------------------------------------------- running
def measure(args, argv):
    """Runs the levels in this process: (record, rows)."""
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    import numpy as np

    with quiet_startup():  # TensorFlow's start-up lines hidden
        import keras

    if args.backend and keras.backend.backend() != args.backend:
        raise cli.UsageError(f"--backend {args.backend}: Keras is already "
                             f"running on {keras.backend.backend()}")
    environment = runtime.describe_environment()
    jit = runtime.jit_compile(args.jit_compile, environment)
    variants = available_variants(args.variants)
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(args.dtype_policy)
    rng = np.random.default_rng(0)
    print(f"{PROG}: backend {environment['backend']}, "
          f"{environment['device']}, jit_compile={jit}", flush=True)
    rows = []
    try:
        for level in LEVELS:
            if level in args.level:
                rows += BENCHES[level](args, variants, jit, rng,
                                       environment)
    finally:
        keras.config.set_dtype_policy(policy)
    return describe(environment, jit, args, argv), rows


class WorkerFailed(Exception):
    """A process of --processes ended with a non-zero code (it said why)."""


def measure_in_processes(args, argv):
    """Runs this command in `args.processes` fresh processes in turn (what
    one process's memory layout does to a ratio averages out) and pools
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
                  command=command(argv))
    return record, pooled_rows([run["rows"] for run in runs])


def pin(cpus):
    """Restricts this process to `cpus` before any framework is imported
    (their thread pools take its size); returns the CPUs it had."""
    allowed = os.sched_getaffinity(0)
    outside = sorted(set(cpus) - allowed)
    if outside:
        raise cli.UsageError(f"--cpus {' '.join(map(str, outside))}: not "
                             f"among this process's CPUs "
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
            raise cli.UsageError("--processes pools the rounds of the layer, "
                                 "matrix, model, jit and devices levels; run "
                                 "the input level in one process")
        if args.cpus:
            pinned_from = pin(args.cpus)
        record, rows = (measure_in_processes if args.processes > 1
                        and not args.worker_output else measure)(args, argv)
        if args.worker_output:
            args.worker_output.write_text(json.dumps(
                {"record": record, "rows": rows}))
            return 0
        path = write_results(args.results_dir, record, rows)
        print(table(rows), end="")
        write_summary(args)
        print(f"results: {path}, {path.with_suffix('.csv')}, "
              f"{args.results_dir / 'summary.md'}")
        return 0
    except cli.UsageError as error:
        return cli.fail(PROG, error, 2)
    except WorkerFailed as failed:
        return cli.fail(PROG, f"a measuring process ended with code "
                        f"{failed.args[0]}; nothing written",
                        130 if failed.args[0] == 130 else 1)
    except runfiles.WriteError as error:
        return cli.fail(PROG, error, 1)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    finally:
        if pinned_from:  # a caller of main() keeps its own CPUs
            os.sched_setaffinity(0, pinned_from)

if __name__ == "__main__":
    sys.exit(main())
