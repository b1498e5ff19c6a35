#!/usr/bin/env python3
"""Train a Wide ResNet on CIFAR-10 with batch normalization or batch
renormalization, and keep a per-epoch history that can be plotted and resumed.

  python train.py --norm renorm                      # the 2017 reference run
  python train.py --norm batchnorm --protocol wrn    # the WRN paper's recipe
  python train.py --norm renorm --train-size 5000 --epochs 2   # a quick look
  python train.py --norm renorm --resume             # after an interruption
  python train.py --norm renorm --batch-size 8 --classes-per-batch 4 \\
      --renorm-schedule 0.04,0.19,0.31 --epochs 10   # non-i.i.d. batches
  python train.py --norm batchnorm --virtual-batch-size 4 --sampling pairs
                                                     # the paper's micro-batches
  KERAS_BACKEND=jax python train.py --norm renorm --devices all  # data parallel

Files of a run NAME (see --name), formats in docs/experiment.md:
  HISTORY_DIR/NAME.csv       one row per epoch, appended as it ends
  HISTORY_DIR/NAME.json      the configuration, sessions and test accuracies
  HISTORY_DIR/NAME.corrections.csv   renorm's r and d per epoch and layer
  HISTORY_DIR/NAME.lock      while a process writes the run
  WEIGHTS_DIR/NAME.weights.h5, NAME.best.weights.h5   last and best weights
  WEIGHTS_DIR/NAME.state.npz what --resume continues from: Ctrl-C or a kill
                             loses at most the epoch in progress
"""

import gc
import os
import signal
import sys
from dataclasses import dataclass

from experiment import console
from experiment import preprocessing
from experiment import flags
from experiment import hosts
from experiment import loops
from experiment import network
from experiment import protocols
from experiment import runfiles
from experiment import runlock
from experiment import runtime
from experiment import sampling
from experiment import train_mode
from experiment.cifar10 import DataError
from experiment.cli import UsageError
from experiment.cli import fail
from experiment.signals import Interrupted
from experiment.signals import interrupts_as_exceptions
from experiment.signals import interrupts_deferred
from experiment.startup import quiet_startup

PROG = "train.py"


def main(argv=None, exiting=False):
    """train.py's exit code; `exiting`: the process ends after it (signals
    after the first stay ignored until the exit)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        config, options, explicit = parse_args(argv)
        if not options.processes.writer:  # process 0 prints for the run
            sys.stdout.flush()  # and the descriptor (JAX prints there too)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        with interrupts_as_exceptions(
                exiting, lambda signum, seconds: stuck(signum, seconds, argv)):
            return train(config, options, explicit, argv)
    except (KeyboardInterrupt, Interrupted) as interruption:
        return interrupted(interruption, " before training began; nothing "
                           "new was saved")
    except UsageError as error:
        return fail(PROG, error, 2)
    except (DataError, OSError, RuntimeError) as error:
        return fail(PROG, error, 1)


def stuck(signum, seconds, argv):
    """The last line of a run whose main thread did not come back from the
    framework to take a signal (the watchdog ends the process after it)."""
    os.write(sys.stderr.fileno(), (console.interrupted(
        signum, ", but the framework did not hand control back within "
        f"{seconds:g} s, so the process ends now; every epoch in the history "
        f"is saved; continue with: {console.resume_command(argv)}")
        + "\n").encode())


def interrupted(interruption, what):
    """Prints the line that ends an interrupted run (the signal, then
    `what`); returns the exit code, 128 + the signal."""
    signum = getattr(interruption, "signum", signal.SIGINT)
    print(console.interrupted(signum, what), file=sys.stderr)
    return 128 + signum


def parse_args(argv):
    """The run's configuration, the options and the flags given."""
    return flags.parse_args(argv, __doc__)


def train(config, options, explicit, argv):
    """The run, with its lock held by its writer (process 0)."""
    paths = runfiles.Paths.of(config["name"], options.history_dir,
                              options.weights_dir)
    if not options.processes.writer:
        return run_training(config, options, explicit, argv, paths)
    runfiles.writable_dir(options.history_dir, "history folder")
    runfiles.writable_dir(options.weights_dir, "weights folder")
    with runlock.run_lock(paths.lock, config["name"],
                          console.command_line(argv), say=note):
        return run_training(config, options, explicit, argv, paths)


def note(message):
    print(f"{PROG}: {message}", file=sys.stderr)


@dataclass
class Run:
    """What the steps of a run share (process 0 of `processes` writes)."""

    config: dict
    paths: runfiles.Paths
    argv: list
    processes: hosts.Processes
    arrays: object = None
    steps: int = 0
    header: list = None
    model: object = None
    loop: object = None


def run_training(config, options, explicit, argv, paths):
    # 1. The run's files: start it, or resume it with its saved configuration.
    config, saved_config, resuming = open_run(config, options, explicit,
                                              paths)
    run = Run(config, paths, argv, options.processes)

    # 2. Data: uint8 images in memory, normalized batch by batch.
    run.arrays = preprocessing.prepare(config, options.data_dir)
    run.steps = sampling.steps_per_epoch(run.arrays.y_train,
                                         **sampling.options(config))
    if not resuming:  # a resumed run keeps the steps it started with
        protocols.resolve_schedule(config, run.steps)

    # 3. Model and optimizer; Keras imported only now: bad input fails fast.
    with quiet_startup():
        import keras  # noqa: F401 (first here, quietly)

    hosts.connect(run.processes)
    config["devices"] = runtime.resolve_devices(config["devices"],
                                                run.processes.count)
    preprocessing.check_devices(config, run.arrays)
    with runtime.keras_settings(config):
        environment, session, loop = compile_model(run)

        # 4. Restore the last finished epoch, or start from scratch.
        start, best, rows, corrections = begin(run, resuming, saved_config,
                                               environment, session)

        # 5. Each epoch: training steps, validation, then a commit to disk.
        run.loop = loops.make(loop, run.model, config, run.arrays, run.steps,
                              run.processes)
        best, best_weights, code = train_epochs(run, start, best, rows,
                                                corrections)
        if code:
            return code  # interrupted: 128 + the signal

        # 6. The end: test accuracy of the last weights, and the files.
        try:
            test = test_accuracy(run, rows, best, best_weights)
        except (KeyboardInterrupt, Interrupted) as interruption:
            return interrupted(
                interruption, " during the test evaluation, after the last "
                f"epoch; all {config['epochs']} epochs are saved; finish "
                f"with: {console.resume_command(argv)}")
    if run.processes.writer:
        finish(paths, test, best, len(run.arrays.x_test))
    return 0


def open_run(config, options, explicit, paths):
    """The run's configuration (the saved one with --resume), the saved JSON
    record, and whether there is a state to resume. The writer removes what
    a killed writer left, and alone refuses to replace a run."""
    writer = options.processes.writer
    removed = runfiles.remove_temporaries(paths.all()) if writer else []
    if removed:
        note(f"removed {len(removed)} temporary file(s) that a killed run "
             f"left: {', '.join(p.name for p in removed)}")
    resuming = options.resume and paths.state.is_file()
    saved_config = {}
    if options.resume and paths.json.is_file():
        saved_config = runfiles.read_json(paths.json)
        config = protocols.resumed_config(config, saved_config, explicit)
    elif resuming:
        raise RuntimeError(f"cannot resume: {paths.json}, the run's "
                           "configuration, is missing")
    elif writer and not options.overwrite and any(
            p.exists() for p in paths.all()):
        raise UsageError(
            f"run {config['name']!r} exists ({paths.csv}, {paths.state}); "
            "pass --resume to continue it, --overwrite to start it again, or "
            "another --name")
    return config, saved_config, resuming


def compile_model(run):
    """Compiles the run's model and chooses the loop that runs the epochs,
    resolving --input and --steps-per-execution; returns the environment,
    this session's record and the loop's name."""
    config = run.config
    run.model = model = network.build_model(config)
    environment = runtime.describe_environment()
    config["input"] = runtime.resolve_input(config["input"], environment,
                                            config["devices"])
    config["steps_per_execution"] = runtime.resolve_steps_per_execution(
        config["steps_per_execution"], environment, run.steps, config["input"])
    model.compile(
        optimizer=network.make_optimizer(config), metrics=["accuracy"],
        loss="sparse_categorical_crossentropy",
        jit_compile=runtime.jit_compile(config["jit_compile"], environment),
        steps_per_execution=config["steps_per_execution"])
    network.build_training_state(model, run.arrays.x_val[:1],
                                 run.arrays.y_val[:1])
    loop, why = loops.choose(config, environment, model.jit_compile)
    environment["training_loop"] = loops.describe(loop, config)
    if why:
        note(why)
    session = dict(
        started=runtime.now(), command=console.command_line(run.argv),
        jit_compile=bool(model.jit_compile), devices=config["devices"],
        **environment,
        statistics_formulation=network.statistics_formulation(model),
        provenance=runtime.provenance(environment))
    return environment, session, loop


def begin(run, resuming, saved_config, environment, session):
    """The epoch to start from, the best so far, the finished epochs' rows
    and corrections rows (saved, or none in a new run's files); prints the
    run's description and schedule warnings."""
    run.header = runfiles.columns(run.config)
    # Before any process loads a state (its assignments are collective).
    hosts.check_same_start(run.processes, runfiles.saved_epoch(
        run.paths.state) if resuming else 0)
    if resuming:
        begun = restore(run, saved_config, session)
    else:
        begun = 0, {"val_accuracy": -1.0, "epoch": 0}, [], []
        if run.processes.writer:
            start_files(run, environment, session)
    print(console.describe_run(run.config, run.model, environment,
                               run.arrays.source, run.steps))
    for warning in protocols.schedule_warnings(run.config, run.steps):
        if run.processes.writer:
            note(f"warning: {warning}")
    return begun


def restore(run, saved_config, session):
    """`begin` from the saved state, which every process loads; the writer
    makes the CSV and weights match it (saying what it repaired) and records
    the new session."""
    model, paths, writer = run.model, run.paths, run.processes.writer
    meta = runfiles.load_state(model, paths.state)
    start, best, corrections = meta["epoch"], meta["best"], meta["corrections"]
    if best["epoch"] == start:
        runfiles.save_weights(model, paths.best, write=writer)
    runfiles.save_weights(model, paths.last, write=writer)
    if not writer:
        return start, best, meta["rows"], corrections
    rows, repaired = runfiles.resumed_rows(paths.csv, run.header, meta)
    if repaired:
        note(repaired)
    if corrections:  # a killed run may have written a later epoch's rows
        runfiles.write_rows(paths.corrections, runfiles.CORRECTION_COLUMNS,
                            corrections)
    record = dict(saved_config, **run.config,
                  **parallel_record(run.config, run.processes))
    record["sessions"] = saved_config.get("sessions", []) + [
        dict(session, first_epoch=start + 1)]
    runfiles.write_json(paths.json, record)
    print(f"resuming run {run.config['name']} after epoch {start} of "
          f"{run.config['epochs']}")
    return start, best, rows, corrections


def start_files(run, environment, session):
    """Removes the run's old files and writes its empty CSV and its JSON."""
    for path in run.paths.all():
        path.unlink(missing_ok=True)
    runfiles.write_rows(run.paths.csv, run.header, [])
    arrays = run.arrays
    runfiles.write_json(run.paths.json, dict(
        run.config, **environment, provenance=session["provenance"],
        data=arrays.source,
        normalization=dict(mean=arrays.mean.tolist(), std=arrays.std.tolist()),
        params=run.model.count_params(), steps_per_epoch=run.steps,
        **parallel_record(run.config, run.processes),
        sessions=[dict(session, first_epoch=1)]))


def parallel_record(config, processes):
    """How a step's batch is split and which statistics the norms compute."""
    devices, virtual = config["devices"], config["virtual_batch_size"]
    per_device = config["batch_size"] // devices
    of_processes = (f" of the {processes.count} processes"
                    if processes.count > 1 else "")
    if virtual is None or virtual >= config["batch_size"]:
        statistics = "of the whole batch" + (
            f", synchronized across the {devices} devices{of_processes}"
            if devices > 1 else "")
    elif devices > 1 and virtual == per_device:
        statistics = (f"per device (groups of {virtual} = the per-device "
                      "batch)")
    else:
        statistics = f"per group of {virtual} consecutive examples" + (
            f" ({per_device // virtual} groups on each of the {devices} "
            "devices)" if devices > 1 else "")
    return {"processes": processes.count,
            "per_process_batch": config["batch_size"] // processes.count,
            "per_device_batch": per_device, "statistics": statistics}


def train_epochs(run, start, best, rows, correction_history):
    """Epochs start+1 .. epochs, each saved as it ends (`rows` and
    `correction_history` grow); returns the best epoch, its weights if one of
    these (else None), and the exit code if interrupted (else None)."""
    config, model, loop, arrays = run.config, run.model, run.loop, run.arrays
    val = loop.resident(run.processes.share(arrays.x_val),
                        run.processes.share(arrays.y_val))
    val_batches = (train_mode.batches(config, arrays)
                   if config["train_mode_validation"] else None)
    tracked = [layer for layer in model.layers
               if getattr(layer, "track_corrections", False)]
    best_weights = None
    # batchnorm with virtual batches is BatchRenormalization too, but its
    # bounds are fixed: only renorm's go into the CSV (runfiles.columns).
    renorm = next((layer for layer in model.layers
                   if type(layer).__name__ == "BatchRenormalization"),
                  None) if config["norm"] == "renorm" else None
    table = console.Table(run.header)
    epoch = start
    try:
        for epoch in range(start, config["epochs"]):
            lr = protocols.lr_at(config, epoch)
            model.optimizer.learning_rate = lr
            logs, seconds = loop.train_epoch(epoch)
            val_logs, eval_seconds = loop.evaluate(val)
            if val_batches is not None:
                val_logs.update({f"{key}_train_mode": value for key, value
                                 in loop.evaluate_train_mode(
                                     val_batches).items()})
            row = epoch_row(epoch, seconds, eval_seconds, logs, val_logs, lr,
                            renorm)
            corrections = correction_rows(epoch, tracked)
            improved = val_logs["accuracy"] > best["val_accuracy"]
            if improved:
                best = {"val_accuracy": val_logs["accuracy"],
                        "epoch": epoch + 1}
                best_weights = model.get_weights()  # for the test at the end
            with interrupts_deferred():
                rows.append(row)
                correction_history.extend(corrections)
                commit_epoch(run, rows, best, improved, correction_history)
            table.print_row(row)
    except (KeyboardInterrupt, Interrupted) as interruption:
        saved = (f"epochs 1-{len(rows)} are saved" if rows
                 else "no epoch had finished")
        return best, best_weights, interrupted(
            interruption, f" in epoch {epoch + 1} of {config['epochs']}; "
            f"{saved}; continue with: {console.resume_command(run.argv)}")
    return best, best_weights, None


def epoch_row(epoch, seconds, eval_seconds, logs, val_logs, lr, renorm):
    """The CSV row of a finished epoch, as written."""
    row = {"epoch": epoch + 1, "seconds": f"{seconds:.3f}",
           "eval_seconds": f"{eval_seconds:.3f}", "lr": f"{lr:.6g}",
           "loss": f"{logs['loss']:.6g}",
           "accuracy": f"{logs['accuracy']:.6g}"}
    for key in ("loss", "accuracy", "loss_train_mode",
                "accuracy_train_mode"):
        if key in val_logs:
            row[f"val_{key}"] = f"{val_logs[key]:.6g}"
    return dict(row, **bounds(renorm)) if renorm is not None else row


def correction_rows(epoch, layers):
    """The corrections CSV's rows of an epoch, one per tracking layer."""
    rows = []
    for layer in layers:
        means = layer.corrections(reset=True)
        rows.append({"epoch": epoch + 1, "layer": layer.name, **{
            key: f"{means[key]:.6g}" for key in runfiles.CORRECTION_COLUMNS
            if key in means}, **bounds(layer)})
    return rows


def bounds(layer):
    """A renorm layer's r_max and d_max after the epoch, as written."""
    return {"r_max": f"{layer.current_r_max():.6g}",
            "d_max": f"{layer.current_d_max():.6g}"}


def commit_epoch(run, rows, best, improved, correction_history):
    """The state first (what --resume trusts: every finished epoch's rows),
    then the CSVs and the weights."""
    model, paths, write = run.model, run.paths, run.processes.writer
    if write:
        runfiles.save_state(model, paths.state, {
            "epoch": rows[-1]["epoch"], "best": best, "rows": rows,
            "corrections": list(correction_history)})
        runfiles.append_row(paths.csv, run.header, rows[-1])
        if correction_history:
            runfiles.write_rows(paths.corrections, runfiles.CORRECTION_COLUMNS,
                                correction_history)
    if improved:
        runfiles.save_weights(model, paths.best, write=write)
    runfiles.save_weights(model, paths.last, write=write)


def test_accuracy(run, rows, best, best_weights):
    """The test accuracy of the last and the best epoch's weights (left in
    the model); where validation was the test set, their val_accuracy."""
    config, arrays, share = run.config, run.arrays, run.processes.share
    if config["val_from"] == "test" and config["val_size"] == len(
            arrays.x_test):
        return {"last": float(rows[-1]["val_accuracy"]),
                "best": best["val_accuracy"]}
    test = run.loop.resident(
        preprocessing.normalize(share(arrays.x_test), arrays.mean,
                                arrays.std), share(arrays.y_test))
    last = run.loop.evaluate(test)[0]["accuracy"]
    if best_weights is None:
        run.model.load_weights(run.paths.best)
    else:
        run.model.set_weights(best_weights)
    return {"last": last, "best": run.loop.evaluate(test)[0]["accuracy"]}


def finish(paths, test, best, test_images):
    """Records the result in the run's JSON and says where the files are."""
    runfiles.write_json(paths.json, dict(
        runfiles.read_json(paths.json), result={
            "test_accuracy": test["last"], "best_test_accuracy": test["best"],
            "test_images": test_images, "best_epoch": best["epoch"],
            "best_val_accuracy": best["val_accuracy"]}))
    print(f"test accuracy {test['last']:.4f} (last weights), "
          f"{test['best']:.4f} (weights of epoch {best['epoch']}, the best "
          f"val_accuracy {best['val_accuracy']:.4f}), on all {test_images} "
          "test images")
    print("files: " + ", ".join(str(p) for p in paths.all() if p.exists()))


if __name__ == "__main__":
    code = main(exiting=True)
    # An interrupted model.fit leaves TensorFlow's generator iterator in a
    # reference cycle, which logs an error if freed at the shutdown.
    gc.collect()
    sys.exit(code)
