#!/usr/bin/env python3
"""Speed of BatchRenormalization against BatchNormalization, side by side.

Commands, levels, variants, method and results files: docs/speed.md.
"""

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiment import cli, runfiles, runtime  # noqa: E402 (after the path)
from experiment.startup import quiet_startup  # noqa: E402

PROG = "bench.py"
COMMAND = "python benchmarks/bench.py"  # a record's command: COMMAND ARGV
LEVELS = ("layer", "matrix", "model", "input", "jit", "devices", "loop")
NORMS = ("batchnorm", "renorm")  # the input, jit, devices and loop levels'
# variant -> (models.norms's name, None for tf.keras's layer; its arguments)
VARIANTS = {
    "batchnorm": ("batchnorm", {}),
    "renorm": ("renorm", {}),
    "renorm-portable": ("renorm", dict(fused=False)),
    "renorm-groups4": ("renorm", dict(virtual_batch_size=4)),
    "keras-renorm": ("keras-renorm", {}),
    "tf.keras-batchnorm": (None, {}),
    "tf.keras-renorm": (None, dict(renorm=True, renorm_momentum=0.99,
        renorm_clipping=dict(rmin=1 / 3, rmax=3.0, dmax=5.0))),
    "renorm-tracked": ("renorm", dict(track_corrections=True)),
}
ON_REQUEST = ("renorm-tracked",)  # only when --variants names it
RESULTS_DIR = ROOT / "benchmarks" / "results"
README_BEGIN = "<!-- bench.md begins -->"
README_END = "<!-- bench.md ends -->"
COLUMNS = ("level", "shape", "variant", "ms_per_step", "ms_min", "ms_max",
           "images_per_s", "ratio", "repeats", "steps", "wait_share", "epoch_s",
           "steps_per_execution", "norm_ratio", "backend", "device")  # .csv's
# The matrix level's setups: (after a trainable scale, so that the input
# gradient is computed; norm layers in a row; a ReLU after each).
LAYER_SETUPS = {"input": (False, 1, False), "input-relu": (False, 1, True),
                "scale": (True, 1, False), "stack4-relu": (True, 4, True)}
LAYER_SCHEDULES = {
    "ramp": dict(warmup_steps=0, r_max_steps=10**6, d_max_steps=10**6),
    "fixed": dict(warmup_steps=0, r_max_steps=0, d_max_steps=0),
}


def build_parser():
    parser = cli.script_parser(PROG, __doc__)
    add = parser.add_argument
    add("--backend", choices=("tensorflow", "jax", "torch"),
        help="Keras backend (default: KERAS_BACKEND)")
    add("--level", nargs="+", choices=LEVELS, default=["layer", "model"],
        metavar="LEVEL", help=f"{', '.join(LEVELS)} (default: layer model)")
    add("--variants", nargs="+", choices=VARIANTS, metavar="VARIANT",
        help=f"{', '.join(VARIANTS)} (default: this backend's but the last)")
    add("--batch-size", type=cli.positive_int, default=128)
    add("--batch-sizes", type=cli.positive_int, nargs="+", metavar="B",
        default=[16, 64, 256], help="matrix level's (default: 16 64 256)")
    add("--setups", nargs="+", choices=LAYER_SETUPS, metavar="SETUP",
        default=list(LAYER_SETUPS), help="matrix level's (default: all)")
    add("--channels", type=cli.positive_int, nargs="+", default=[64, 128, 256],
        help="C of (B, 32, 32, C); matrix: the first (default: 64 128 256)")
    add("--depth", type=cli.positive_int, default=16, help="WRN's (16)")
    add("--width", type=cli.positive_int, default=4, help="WRN's (4)")
    add("--steps", type=cli.positive_int, help="steps per timed repeat "
        "(default 50; on a CPU 3 for a layer, 2 for a WRN)")
    add("--repeats", type=cli.positive_int, default=5, help="(default 5)")
    add("--warmup", type=cli.positive_int, default=2, help="untimed steps (2)")
    add("--steps-per-execution", type=cli.steps_or_auto, default="auto",
        metavar="N", help="input level: as train.py's (default auto)")
    add("--dtype-policy", default="float32",
        choices=("float32", "mixed_float16", "mixed_bfloat16"))
    add("--jit-compile", choices=("auto", "on", "off"), default="auto")
    add("--data-dir", type=Path, help="input and loop levels' CIFAR-10, as "
        "train.py's (else random images)")
    add("--cpus", type=cli.nonnegative_int, nargs="+", metavar="CPU",
        help="run on these CPUs only, the framework's threads too")
    add("--processes", type=cli.positive_int, default=1, metavar="N",
        help="pool the rounds of N fresh processes in turn (default 1)")
    add("--worker-output", type=Path, help=argparse.SUPPRESS)
    add("--results-dir", type=Path, default=RESULTS_DIR)
    add("--summary", action="store_true",
        help="only rewrite summary.md (and --readme) from the results files")
    add("--readme", type=Path, metavar="FILE",
        help="also rewrite FILE's bench.md block (docs/speed.md)")
    return parser


def timed(run, level, shape, steppers, baseline, steps, batch_size=None,
          warmup=None):
    """Warms up `steppers` (name -> function(n): n steps, device waited for),
    times --repeats rounds of them in turn: rows, name -> s/step per round."""
    def seconds(step, n):
        started = time.perf_counter()
        step(n)
        return time.perf_counter() - started

    print(f"{level}, {shape}:", flush=True)
    for name, step in steppers.items():
        print(f"  warm-up {name}: {seconds(step, warmup or run.warmup):.1f} s",
              flush=True)
    times = {name: [] for name in steppers}
    for repeat in range(run.repeats):
        for name, step in steppers.items():
            times[name].append(seconds(step, steps) / steps)
        print(f"  repeat {repeat + 1}/{run.repeats}: " + ", ".join(
            f"{n} {1000 * t[-1]:.1f} ms" for n, t in times.items()),
            flush=True)
    return rows_of(level, shape, times, batch_size or run.batch_size, steps,
                   baseline), times


def median_ratio(values, baseline):
    """The median over the rounds of value / baseline of the same round."""
    return round(statistics.median(
        [v / b for v, b in zip(values, baseline)]), 4)


def rows_of(level, shape, times, batch_size, steps, baseline):
    """A row per variant of `times`: median, spread, ratio by round."""
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
    """Several processes' rows as one run's, each round with its baseline."""
    groups = {}  # (level, shape) -> (its first row, variant -> seconds)
    for row in itertools.chain(*runs):
        _, times = groups.setdefault((row["level"], row["shape"]), (row, {}))
        times.setdefault(row["variant"], []).extend(
            ms / 1000 for ms in row["ms_repeats"])
    return [pooled for (level, shape), (row, times) in groups.items()
            for pooled in rows_of(level, shape, times, row["batch_size"],
                                  row["steps"], row["baseline"])]


def available_variants(requested, backend):
    """`backend`'s variants: those `requested`, else all but ON_REQUEST."""
    import batch_renorm

    lacking = set() if batch_renorm.has_fast_path() else {"renorm-portable"}
    if backend != "tensorflow" or tf_keras() is None:
        lacking |= {"tf.keras-batchnorm", "tf.keras-renorm"}
    names = [v for v in VARIANTS if v not in lacking]
    if not requested:
        return [v for v in names if v not in ON_REQUEST]
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
    """A function(**layer arguments) -> layer, and its Keras API."""
    import keras

    from models.norms import make_norm

    norm, options = VARIANTS[variant]
    if norm is not None:
        return (lambda **kwargs: make_norm(norm, **options, **kwargs)), keras
    api = tf_keras()
    # fused=None: tf.keras fuses where it can (not with renorm).
    return (lambda **kwargs: api.layers.BatchNormalization(
        momentum=0.99, epsilon=1e-3, **options, **kwargs)), api


def stepper(model, api, jit, x, y, loss="sparse_categorical_crossentropy",
            scope=contextlib.nullcontext):
    """A function(n): n SGD steps of `model` on (x, y) in `scope`."""
    model.compile(optimizer=api.optimizers.SGD(learning_rate=1e-3),
                  loss=loss, jit_compile=jit)
    if api.__name__ == "tf_keras":
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
        with scope():
            for _ in range(steps):
                loss = model.train_on_batch(x, y)
        float(loss if not isinstance(loss, list) else loss[0])
    return run


def layer_model(variant, shape, setup, **schedule):
    """Norm layers on `shape` placed as `setup` says, with `schedule`."""
    make, api = norm_factory(variant)
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
                       **schedule)(outputs)
        if relu:
            outputs = api.layers.ReLU()(outputs)
    return api.Model(inputs, outputs), api


def wrn(run, variant, **options):
    from models.wide_resnet import wide_resnet

    make, api = norm_factory(variant)
    return wide_resnet(run.depth, run.width, norm=make, norm_kwargs=options,
                       keras_api=api), api


def wrn_batch(run):
    x = run.rng.standard_normal((run.batch_size, 32, 32, 3), dtype="float32")
    return x, run.rng.integers(0, 10, run.batch_size).astype("int32")


def bench_layers(run, level):
    """layer: per --channels, after a scale; matrix: per --batch-sizes and
    --setups, each renorm variant per schedule (`renorm@ramp`, ...)."""
    import keras

    if level == "layer":
        cases = [(run.batch_size, c, "scale", [None]) for c in run.channels]
    else:
        cases = [(b, run.channels[0], setup, list(LAYER_SCHEDULES))
                 for b in run.batch_sizes for setup in run.setups]
    rows = []
    for b, c, setup, schedules in cases:
        shape = (b, 32, 32, c)
        x, y = map(keras.ops.convert_to_tensor, (
            run.rng.standard_normal(shape, dtype="float32") * 2 + 0.5,
            run.rng.standard_normal(shape, dtype="float32")))
        steppers = {}
        for variant in run.variants:
            for regime in schedules if variant.startswith("renorm") else [None]:
                model, api = layer_model(variant, shape, setup,
                                         **LAYER_SCHEDULES.get(regime, {}))
                name = variant + (f"@{regime}" if regime else "")
                steppers[name] = stepper(model, api, run.jit, x, y, "mse")
        label = f"{b}x32x32x{c}" + (f" {setup}" if level == "matrix" else "")
        rows += timed(run, level, label, steppers, "batchnorm",
                      run.layer_steps, b)[0]
    return rows


def bench_wrn(run, level):
    """The model, jit and devices levels (docs/speed.md)."""
    import keras

    # baseline -> name -> (variant, jit_compile, scope, options)
    plain = contextlib.nullcontext
    if level == "model":
        settings = {"batchnorm": {v: (v, run.jit, plain, {})
                                  for v in run.variants}}
    elif level == "jit":
        settings = {f"{n}, jit_compile=off": {
            f"{n}, jit_compile={s}": (n, s == "on", plain, {})
            for s in ("off", "on")} for n in NORMS}
    else:
        devices = keras.distribution.list_devices()
        count, many = len(devices), f"{len(devices)} devices"
        if count < 2:
            raise cli.UsageError(
                "--level devices needs several devices; JAX sees one (on a "
                "CPU: XLA_FLAGS=--xla_force_host_platform_device_count=4)")
        if run.batch_size % count:
            raise cli.UsageError(f"--batch-size {run.batch_size} does not "
                                 f"split over {many}")
        parallel = keras.distribution.DataParallel(devices=devices).scope
        settings = {f"{n}, 1 device": {
            f"{n}, 1 device": (n, True, plain, {}),
            f"{n}, {many}": (n, True, parallel, {})} for n in NORMS}
        settings["renorm, 1 device"][f"renorm, {many}, per-device statistics"] \
            = ("renorm", True, parallel,
               dict(virtual_batch_size=run.batch_size // count))
    # devices: NumPy batches for all, as each step moves (and under
    # DataParallel splits) its batch: the same work for every setting.
    x, y = wrn_batch(run)
    if level != "devices":
        x, y = map(keras.ops.convert_to_tensor, (x, y))
    rows = []
    for baseline, group in settings.items():
        steppers = {}
        for name, (variant, jit, scope, options) in group.items():
            with scope():
                model, api = wrn(run, variant, **options)
                steppers[name] = stepper(model, api, jit, x, y, scope=scope)
        rows += timed(run, level, run.wrn_shape, steppers, baseline,
                      run.wrn_steps)[0]
    return rows


def fitter(model, make_batches, epoch, steps_per_fit=None):
    """A stepper of model.fit on `make_batches()`, a new epoch's generator
    (`epoch` counts them), `steps_per_fit` steps a fit (default: all)."""
    def run(n):
        per_fit = steps_per_fit or n
        for _ in range(-(-n // per_fit)):
            epoch[0] += 1
            model.fit(make_batches(), steps_per_epoch=per_fit, epochs=1,
                      verbose=0, shuffle=False)
            int(model.optimizer.iterations)  # waits for the device
    return run


def bench_input(run, level):
    """train.py's fit fed by each pipeline, for each norm (docs/speed.md)."""
    import keras

    from experiment import sampling

    data = training_data(run)
    per_execution = runtime.resolve_steps_per_execution(
        run.steps_per_execution, run.environment, run.wrn_steps)
    print(f"input level: steps_per_execution={per_execution}, data: "
          f"{data.source}", flush=True)
    two = slice(0, 2 * run.batch_size)
    resident = [tuple(map(keras.ops.convert_to_tensor, batch))
                for batch in sampling.train_batches(
                    data.x_train[two], data.y_train[two], run.batch_size,
                    data.mean, data.std, run.rng)]
    pipelines = {  # each a new epoch's generator, as fit takes
        "resident": lambda: (batch for batch in itertools.cycle(resident)),
        **data.pipelines}
    steppers = {}
    for norm in NORMS:
        model, _ = wrn(run, norm)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=1e-3),
                      loss="sparse_categorical_crossentropy",
                      jit_compile=run.jit, steps_per_execution=per_execution)
        for pipeline, make in pipelines.items():
            steppers[f"{norm}, {pipeline}"] = fitter(model, make,
                                                     data.epoch)
    rows, times = timed(run, level, run.wrn_shape, steppers,
                        "batchnorm, resident", run.wrn_steps)
    steps_per_epoch = -(-len(data.x_train) // run.batch_size)
    for row in rows:  # waiting: against the same norm's resident steps
        resident_times = times[row["variant"].split(", ")[0] + ", resident"]
        row["wait_share"] = round(
            1 - median_ratio(resident_times, times[row["variant"]]), 4)
        row["epoch_s"] = round(row["ms_per_step"] * steps_per_epoch / 1000, 3)
        row["steps_per_execution"] = per_execution
    return rows


def bench_loop(run, level):
    """train.py's two JAX loops for each norm (docs/speed.md)."""
    import keras

    from experiment import compiled_epoch

    steps = run.wrn_steps
    data = training_data(run, steps * run.batch_size)
    config = {"batch_size": run.batch_size, "seed": 0, "augment": True,
              "classes_per_batch": None, "sampling": "iid",
              "virtual_batch_size": None, "steps_per_execution": steps,
              "eval_batch_size": run.batch_size}
    print(f"loop level: epochs of {steps} steps, data: {data.source}",
          flush=True)

    def per_step(model):
        return fitter(model, data.pipelines["device"], data.epoch, steps)

    def compiled(model):
        epochs = compiled_epoch.CompiledEpochs(model, config, data, steps)
        epochs.progress = False

        def step(n):
            for _ in range(-(-n // steps)):
                data.epoch[0] += 1
                epochs.train_epoch(data.epoch[0])
        return step

    steppers = {}
    for norm in NORMS:
        for loop, make in (("per-step", per_step), ("compiled", compiled)):
            model, _ = wrn(run, norm)
            model.compile(optimizer=keras.optimizers.Adam(1e-3),
                          loss="sparse_categorical_crossentropy",
                          metrics=["accuracy"], jit_compile=run.jit)
            model.optimizer.build(model.trainable_variables)
            model._symbolic_build(data_batch=(*wrn_batch(run), None))
            steppers[f"{norm}, {loop}"] = make(model)
    rows, times = timed(run, level, run.wrn_shape, steppers,
                        "batchnorm, per-step", steps,
                        warmup=max(run.warmup, steps))
    for row in rows:
        loop = row["variant"].split(", ")[1]
        row["norm_ratio"] = median_ratio(times[row["variant"]],
                                         times[f"batchnorm, {loop}"])
    return rows


BENCHES = {"layer": bench_layers, "matrix": bench_layers, "model": bench_wrn,
           "input": bench_input, "jit": bench_wrn, "devices": bench_wrn,
           "loop": bench_loop}


def training_data(run, count=None):
    """CIFAR-10's first `count` training images as train.py finds them
    (else random ones), their mean, std, source, an epoch counter and
    pipelines: `host`, `device`, each () -> a new epoch's batches."""
    import numpy as np

    from experiment import cifar10, device_data, sampling
    from experiment.preprocessing import channel_stats

    try:
        data = cifar10.load(run.data_dir)
        images, labels, source = data.x_train, data.y_train, data.source
    except cifar10.DataError:
        images = run.rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8)
        labels = run.rng.integers(0, 10, 50000).astype(np.int32)
        source = "random uint8 images (CIFAR-10 not found)"
    images, labels = images[:count], labels[:count]
    mean, std = channel_stats(images)
    on_device = device_data.DeviceTrainSet(images, labels, mean, std,
                                           augmented=True)
    epoch = [0]
    pipelines = {
        "host": lambda: sampling.train_batches(
            images, labels, run.batch_size, mean, std,
            sampling.epoch_rng(0, epoch[0]), augmented=True),
        "device": lambda: on_device.train_batches(
            run.batch_size, sampling.epoch_rng(0, epoch[0]))}
    return SimpleNamespace(x_train=images, y_train=labels, mean=mean, std=std,
                           source=source, epoch=epoch, pipelines=pipelines)


def write_results(results_dir, record, rows):
    """BACKEND-DEVICE[-xla].json and .csv, `rows` replacing their levels'."""
    # TensorFlow with and without XLA side by side
    xla = record["backend"] == "tensorflow" and record["jit_compile"] is True
    path = results_dir / (f"{record['backend']}-{record['device_type']}"
                          + "-xla" * xla + ".json")
    if path.is_file():
        old = json.loads(path.read_text())
        levels = {row["level"] for row in rows}
        rows = [r for r in old["rows"] if r["level"] not in levels] + rows
        record = dict(record, earlier={k: old[k] for k in ("date", "command")})
    results_dir.mkdir(parents=True, exist_ok=True)
    runfiles.write_file(path, (json.dumps(dict(record, rows=rows), indent=1)
                               + "\n").encode())
    runfiles.write_file(path.with_suffix(".csv"), runfiles.csv_text(COLUMNS, [
        dict(row, backend=record["backend"], device=record["device"])
        for row in rows]).encode())
    return path


def table(rows):
    """Markdown, the input and loop levels' own figures after the ratio."""
    lines = [("| level | shape | variant | ms/step (median) | min-max | "
              "images/s | ratio |"), "|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
        if row["level"] == "input" and "resident" not in row["variant"]:
            ratio += (f" (waiting {100 * row['wait_share']:.1f}%; "
                      f"{row['epoch_s']:.1f} s per epoch)")
        if row["level"] == "loop" and row["variant"].startswith("renorm"):
            ratio += f" (renorm / batchnorm {row['norm_ratio']:.3f})"
        lines.append(f"| {row['level']} | {row['shape']} | {row['variant']} "
                     f"| {row['ms_per_step']:.1f} | {row['ms_min']:.1f}-"
                     f"{row['ms_max']:.1f} | {row['images_per_s']:.1f} | "
                     f"{ratio} |")
    return "\n".join(lines) + "\n"


SUMMARY_NOTE = (
    "Ratio: the median over the repeats of the time per step over the "
    "baseline's in the same repeat; each level's baseline, waiting, s per "
    "epoch and renorm / batchnorm: docs/speed.md. Written by "
    "`benchmarks/bench.py` from `benchmarks/results/*.json`.\n")


def write_summary(args):
    """summary.md (and --readme's block): a table per results file."""
    parts = []
    for path in sorted(args.results_dir.glob("*.json")):
        record = json.loads(path.read_text())
        versions, backend = record["versions"], record["backend"]
        processes = record.get("processes", 1)  # not in the earliest files
        parts.append(
            f"**{backend}** on {record['device']} (Keras "
            f"{versions['keras']}, {backend} {versions[backend]}, "
            f"jit_compile={record['jit_compile']}, {record['dtype_policy']}, "
            f"threads {record['threads']}"
            + (f", rounds of {processes} processes" if processes > 1 else "")
            + f"; {record['date']})\n")
        parts.append(table(record["rows"]))
    text = "# Benchmarks\n\n" + "\n".join(parts) + "\n" + SUMMARY_NOTE
    runfiles.write_file(args.results_dir / "summary.md", text.encode())
    if args.readme:
        try:
            runfiles.replace_block(args.readme, README_BEGIN, README_END,
                                   text.split("\n", 2)[2])  # less the title
        except ValueError as error:
            raise cli.UsageError(error) from None
    return text


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
    for level in ("devices", "loop"):
        if level in args.level and environment["backend"] != "jax":
            raise cli.UsageError(f"--level {level} needs the jax backend "
                                 "(run it with --backend jax)")
    cpu = environment["device_type"] == "cpu"
    # The flags, with the variants this backend has and the steps of a
    # repeat resolved (`layer_steps` for a layer, `wrn_steps` for a WRN).
    run = SimpleNamespace(**dict(
        vars(args), environment=environment,
        jit=runtime.jit_compile(args.jit_compile, environment),
        variants=available_variants(args.variants, environment["backend"]),
        rng=np.random.default_rng(0),
        layer_steps=args.steps or (3 if cpu else 50),
        wrn_steps=args.steps or (2 if cpu else 50),
        wrn_shape=f"WRN-{args.depth}-{args.width}, {args.batch_size}x32x32x3"))
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(args.dtype_policy)
    print(f"{PROG}: backend {environment['backend']}, "
          f"{environment['device']}, jit_compile={run.jit}", flush=True)
    try:
        rows = [row for level in LEVELS if level in args.level
                for row in BENCHES[level](run, level)]
    finally:
        keras.config.set_dtype_policy(policy)
    threads = {"cpu_count": os.cpu_count(),
               "cpus": sorted(os.sched_getaffinity(0))}
    if environment["backend"] == "torch":
        import torch

        threads["torch_threads"] = torch.get_num_threads()
    elif environment["backend"] == "tensorflow":
        import tensorflow as tf

        pools = tf.config.threading
        threads["tf_intra_op"] = pools.get_intra_op_parallelism_threads()
        threads["tf_inter_op"] = pools.get_inter_op_parallelism_threads()
        if tf_keras() is not None:
            environment["versions"]["tf_keras"] = tf_keras().__version__
    return dict(environment, threads=threads, jit_compile=run.jit,
                batch_size=run.batch_size, dtype_policy=run.dtype_policy,
                date=runtime.now(), processes=1,
                command=" ".join([COMMAND, *argv])), rows


def measure_in_processes(args, argv):
    """This command in --processes fresh processes, rounds pooled."""
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.processes):
            output = Path(folder) / f"{index}.json"
            print(f"{PROG}: process {index + 1} of {args.processes}",
                  flush=True)
            subprocess.check_call([sys.executable, __file__, *argv,
                                   "--worker-output", str(output)])
            runs.append(json.loads(output.read_text()))
    record = dict(runs[0]["record"], processes=args.processes,
                  command=" ".join([COMMAND, *argv]))
    return record, pooled_rows([run["rows"] for run in runs])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    allowed = os.sched_getaffinity(0)
    try:
        args = build_parser().parse_args(argv)
        if args.summary:
            print(write_summary(args), end="")
            return 0
        if args.processes > 1 and {"input", "loop"} & set(args.level):
            # Their extra columns are of one process's rounds.
            raise cli.UsageError("--processes pools the rounds of the layer, "
                                 "matrix, model, jit and devices levels; run "
                                 "the input and loop levels in one process")
        if args.cpus:  # before a framework sizes its thread pools
            outside = sorted(set(args.cpus) - allowed)
            if outside:
                raise cli.UsageError(f"--cpus {' '.join(map(str, outside))}: "
                                     "not among this process's CPUs ("
                                     f"{' '.join(map(str, sorted(allowed)))})")
            os.sched_setaffinity(0, set(args.cpus))
        pooled = args.processes > 1 and not args.worker_output
        record, rows = (measure_in_processes if pooled else measure)(args,
                                                                     argv)
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
    except subprocess.CalledProcessError as failed:
        return cli.fail(PROG, f"a measuring process ended with code "
                        f"{failed.returncode}; nothing written",
                        130 if failed.returncode == 130 else 1)
    except runfiles.WriteError as error:
        return cli.fail(PROG, error, 1)
    except KeyboardInterrupt:
        return cli.fail(PROG, "interrupted; nothing written", 130)
    finally:
        os.sched_setaffinity(0, allowed)  # a caller of main() keeps its CPUs


if __name__ == "__main__":
    sys.exit(main())
