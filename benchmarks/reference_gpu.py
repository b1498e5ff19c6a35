#!/usr/bin/env python3
"""The 2017 reproduction on a GPU in one command: the `seed` protocol
(WRN-16-4, Adam, batch 128, 100 epochs, validated on the 10,000 test images
as the 2017 code did) with batchnorm and renorm on JAX, then bench.py's
model level, inside a time budget. What the machine needs, the budget and
the files that come back: docs/gpu.md.

  python benchmarks/reference_gpu.py --time-budget 540 --output-dir OUT
  python benchmarks/reference_gpu.py --seeds 1 ...   # a later window: seed 1
  python benchmarks/reference_gpu.py --tiny          # the same job in small,
                                                     # on any device (CI: CPU)

Steps, in priority order: the first seed's runs (train.py --input device
--resume), bench.py, the other seeds' runs; plot.py after each run. With
--time-budget SECONDS the first run is the measurement (its first 3 epochs
always run); a later step starts only if its estimate fits the time left
(a norm not measured yet: 1.35 x a measured one; bench.py: 4 x a run's
start-up), else one line names it; a run whose projected end passes the
budget is stopped (SIGTERM: the same command continues it). A loss or
val_loss that is not finite fails the job (exit 1). Files go below gpu-SLUG
(the GPU's name) in each folder; with --output-dir DIR, as each step ends
and written atomically: NAME.tar (a run's history, last weights),
NAME.best.tar, reports.tar (plots, bench.py's results, the summary) and
summary.md.
"""

import csv
import io
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiment import cli, protocols, runfiles  # noqa: E402 (after the path)

PROG = "reference_gpu.py"
# The 2017 comparison: Keras's BatchNormalization against this layer
# (keras-renorm, Keras's own renorm=True, is no part of it).
NORMS = tuple(norm for norm in protocols.NORMS if norm != "keras-renorm")
# --tiny: the same commands, files and budget logic in a minute or two on a
# CPU; 4 steps per execution so that train.py's compiled epoch runs too.
TINY_EPOCHS = 3
TINY_FLAGS = ["--depth", "10", "--width", "1", "--train-size", "256",
              "--val-size", "100", "--batch-size", "32",
              "--eval-batch-size", "100", "--steps-per-execution", "4"]
TINY_BENCH = ["--depth", "10", "--width", "1", "--steps", "1", "--repeats",
              "2", "--batch-size", "16", "--variants", "batchnorm", "renorm"]
HOW_TO_GET_JAX = ("install a CUDA build of JAX first (pip install -U "
                  "'jax[cuda13]', or 'jax[cuda12]' for a CUDA 12 driver), "
                  "or run with --tiny on the CPU")
PROBE_EPOCHS = 3  # the first compiles; two more give an epoch's time
# A norm not measured yet costs this times a measured one: above the
# renorm / batchnorm ratios of epoch times measured on GPUs.
UNMEASURED = 1.35
# bench.py --level model compiles four variants, each about a run's start-up.
BENCH_VARIANTS = 4
PLOT_GUESS = 10.0  # seconds of plot.py before it has run once
POLL = 0.25  # seconds between two looks at a run's CSV
STOP_WAIT = 120  # seconds a stopped step has to exit before it is killed
SUMMARY_NAME = "reference_gpu.md"  # summary.md inside reports.tar
LOSSES = ("loss", "val_loss")


def build_parser():
    parser = cli.script_parser(PROG, __doc__)
    add = parser.add_argument
    add("--norms", nargs="+", choices=NORMS, default=list(NORMS),
        metavar="NORM", help="default: " + " ".join(NORMS))
    add("--seeds", nargs="+", type=cli.nonnegative_int, default=[0],
        metavar="SEED", help="default: 0")
    add("--precision", choices=protocols.PRECISIONS, default="mixed_bfloat16",
        help="dtype policy of every run (default: mixed_bfloat16)")
    add("--epochs", type=cli.positive_int, help="default: the protocol's 100 "
        f"({TINY_EPOCHS} with --tiny)")
    add("--time-budget", type=cli.positive_float, metavar="SECONDS",
        help="end within about SECONDS: start only the steps estimated to "
        "fit (default: no limit)")
    add("--output-dir", type=Path, metavar="DIR", help="copy each finished "
        "run, the plots, the benchmark and the summary into DIR as they come")
    add("--tiny", action="store_true", help=f"WRN-10-1, 256 images, "
        f"{TINY_EPOCHS} epochs, on whatever device JAX has")
    add("--data-dir", type=Path, metavar="DIR",
        help="CIFAR-10 (default: $CIFAR10_DIR)")
    for name in ("history", "weights", "plots"):
        add(f"--{name}-dir", type=Path, default=Path(name), metavar="DIR")
    add("--results-dir", type=Path, metavar="DIR",
        default=ROOT / "benchmarks" / "results")
    add("--bench-repeats", type=cli.positive_int, default=5,
        help="bench.py --repeats (default 5)")
    return parser


class NoGPU(Exception):
    """Keras cannot run here on a JAX GPU; the message says what to do."""


def gpu_name(tiny):
    """The name of the device JAX computes on; NoGPU where Keras does not
    run on JAX, or JAX has no GPU (unless `tiny`)."""
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        raise NoGPU(f"KERAS_BACKEND is {os.environ['KERAS_BACKEND']}; "
                    "this job runs on jax (unset it or set it to jax)")
    try:
        import jax
    except ImportError:
        raise NoGPU(f"JAX is not installed; {HOW_TO_GET_JAX}") from None
    device = jax.devices()[0]
    if device.platform != "gpu" and not tiny:
        raise NoGPU(f"JAX sees no GPU (its devices: {device.platform}); "
                    f"{HOW_TO_GET_JAX}")
    return device.device_kind if device.platform == "gpu" else "cpu"


# ------------------------------------------------------------ the steps
@dataclass
class Folders:
    """Where the job's files go (each below gpu-SLUG)."""

    history: Path
    weights: Path
    plots: Path
    results: Path

    def archived(self, path, where):
        """The path of a file of these folders inside an archive: the
        repository's."""
        names = {self.history: "history", self.weights: "weights",
                 self.plots: "plots", self.results: "benchmarks/results"}
        return f"{names[path.parent]}/{where}/{path.name}"


@dataclass
class Step:
    """A program the job runs: a training run (`norm` set) or the bench."""

    script: str
    argv: list
    name: str
    norm: object = None
    epochs: int = 0
    status: str = "not started"
    estimate: object = None  # seconds, as reckoned before it started
    wall: object = None  # seconds it ran in this job

    @property
    def is_run(self):
        return self.norm is not None


def plan(args, folders, epochs):
    """The steps in priority order: the first seed's runs, the bench, the
    other seeds' runs."""

    def runs(seeds):
        steps = []
        for seed in seeds:
            for norm in args.norms:
                name = f"{norm}-seed-s{seed}"
                argv = ["--norm", norm, "--protocol", "seed", "--seed",
                        str(seed), "--name", name, "--val-from", "test",
                        "--precision", args.precision, "--input", "device",
                        "--history-dir", str(folders.history),
                        "--weights-dir", str(folders.weights), "--resume",
                        "--epochs", str(epochs)]
                argv += TINY_FLAGS if args.tiny else []
                argv += ["--data-dir", str(args.data_dir)] if args.data_dir \
                    else []
                steps.append(Step("train.py", argv, name, norm, epochs))
        return steps

    bench = ["--backend", "jax", "--level", "model", "--dtype-policy",
             args.precision, "--results-dir", str(folders.results)]
    bench += TINY_BENCH if args.tiny else ["--repeats",
                                           str(args.bench_repeats)]
    return (runs(args.seeds[:1]) + [Step("benchmarks/bench.py", bench,
                                         "bench")] + runs(args.seeds[1:]))


# ------------------------------------------------------------ the budget
class Budget:
    """The job's clock: seconds since it started, and those left."""

    def __init__(self, seconds):
        self.seconds, self.started = seconds, time.monotonic()

    def elapsed(self):
        return time.monotonic() - self.started

    def left(self):
        return (math.inf if self.seconds is None
                else self.seconds - self.elapsed())


@dataclass
class Cost:
    """A run's seconds from its start to its first new CSV row (start-up,
    compilation, an epoch), per epoch after that, from its last row to its
    exit."""

    start: float
    epoch: float
    end: float

    def of(self, epochs_to_go):
        return self.start + max(epochs_to_go - 1, 0) * self.epoch + self.end


@dataclass
class Costs:
    """What the job has measured: runs by norm, and plot.py."""

    runs: dict
    plot: object = None

    def plot_seconds(self):
        return PLOT_GUESS if self.plot is None else self.plot

    def of_norm(self, norm):
        """The Cost of a run of `norm` (else the last measured norm's times
        UNMEASURED; None before any) and a note that says which."""
        if norm in self.runs:
            return self.runs[norm], ""
        if not self.runs:
            return None, ""
        last = list(self.runs.values())[-1]
        return (Cost(last.start * UNMEASURED, last.epoch * UNMEASURED,
                     last.end * UNMEASURED),
                f", x{UNMEASURED:g} for a norm not measured yet")


def rows_done(step, folders):
    """The epochs in the run's CSV (0 where it is unreadable, as when caught
    mid-write: train.py --resume repairs it)."""
    try:
        return len(runfiles.read_rows(folders.history / f"{step.name}.csv"))
    except (OSError, UnicodeDecodeError, csv.Error):
        return 0


def estimate(step, costs, folders):
    """Seconds that `step` should take and how they were reckoned; None
    before anything is measured."""
    if not step.is_run:
        start = max((cost.start for cost in costs.runs.values()),
                    default=None)
        return None if start is None else (
            BENCH_VARIANTS * start,
            f"{BENCH_VARIANTS} variants x a run's start-up {start:.1f} s")
    cost, note = costs.of_norm(step.norm)
    if cost is None:
        return None
    to_go = max(step.epochs - rows_done(step, folders), 0)
    plot = costs.plot_seconds()
    return cost.of(to_go) + plot, (
        f"start-up {cost.start:.1f} s + {max(to_go - 1, 0)} epochs x "
        f"{cost.epoch:.2f} s + end {cost.end:.1f} s{note}, + plot "
        f"{plot:.1f} s")


def measured(seen, started, ended, finished):
    """The Cost of a watched run from `seen`, (rows new in this job, time)
    each time its CSV grew; None where none came. An unfinished run's end:
    an epoch's time."""
    if not seen:
        return None
    (first_rows, first), (last_rows, last) = seen[0], seen[-1]
    if last_rows > first_rows:
        epoch = (last - first) / (last_rows - first_rows)
    else:  # one look saw every row: the start-up's share is unknown
        epoch = (first - started) / first_rows
    start = max(first - started - (first_rows - 1) * epoch, epoch)
    return Cost(start, epoch, ended - last if finished else epoch)


# ------------------------------------------------------------ running
def launch(script, argv):
    print(f"{PROG}: {shlex.join(['python', script, *argv])}", flush=True)
    return subprocess.Popen([sys.executable, str(ROOT / script), *argv],
                            cwd=ROOT, env=dict(os.environ, KERAS_BACKEND="jax"))


def stop(process):
    """SIGTERM (train.py saves and exits), a kill after STOP_WAIT seconds;
    its exit code."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(STOP_WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def look(step, folders, before, seen, now=None):
    """Appends (rows new since `before`, the time) to `seen` where the run's
    CSV has grown; whether it has."""
    new = rows_done(step, folders) - before
    if new <= (seen[-1][0] if seen else 0):
        return False
    seen.append((new, time.monotonic() if now is None else now))
    return True


def train(step, folders, budget, costs, probe):
    """Runs train.py for `step`, stopped where `overrun` says; its exit
    code, Cost (None where no epoch ended) and why it was stopped."""
    before = rows_done(step, folders)
    guess = costs.of_norm(step.norm)[0]
    seen, started = [], time.monotonic()

    def why_stop():
        if look(step, folders, before, seen) or budget.left() <= 0:
            return overrun(step, before, seen, started, budget, costs, guess,
                           probe)
        return None

    code, step.wall, why = run_watched(step, why_stop)
    ended = started + step.wall
    look(step, folders, before, seen, ended)
    finished = why is None and code == 0
    return code, measured(seen, started, ended, finished), why


def overrun(step, before, seen, started, budget, costs, guess, probe):
    """Why the run should stop now, or None: its projected end (at its own
    pace once two rows came, else `guess`'s) passes the budget, or the
    budget is spent; never with no epoch to go, nor for the `probe` before
    its PROBE_EPOCHS."""
    new = seen[-1][0] if seen else 0
    to_go = step.epochs - before - new
    if budget.seconds is None or to_go <= 0 or (probe and
                                                new < PROBE_EPOCHS):
        return None
    left = budget.left()
    if left <= 0:
        return (f"the budget is spent, {before + new} of {step.epochs} "
                "epochs done; the same command continues it")
    pace = (measured(seen, started, time.monotonic(), False)
            if len(seen) > 1 else guess)
    if pace is None:
        return None
    needed = to_go * pace.epoch + pace.end + costs.plot_seconds()
    if needed <= left:
        return None
    return (f"its {to_go} epochs to go need about {needed:.0f} s "
            f"({pace.epoch:.2f} s an epoch), {left:.0f} s of the budget "
            "left; the same command continues it")


def run_watched(step, why_stop):
    """Runs `step`, asking `why_stop()` between two looks: a reason stops
    it. Its exit code, seconds and the reason (None: not stopped)."""
    started = time.monotonic()
    process = launch(step.script, step.argv)
    while True:
        try:
            return process.wait(POLL), time.monotonic() - started, None
        except subprocess.TimeoutExpired:
            why = why_stop()
            if why:
                print(f"{PROG}: stopping {step.name}: {why}", flush=True)
                return stop(process), time.monotonic() - started, why


# ------------------------------------------------------------ the output
class NotFinite(Exception):
    """A run's history holds a loss that is not finite."""


def check_finite(step, folders):
    """NotFinite (naming run, column and epoch) where a loss or val_loss of
    the run's CSV is NaN or infinite."""
    path = folders.history / f"{step.name}.csv"
    for row in runfiles.read_rows(path):
        for column in LOSSES:
            try:
                value = float(row.get(column) or "nan")
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise NotFinite(
                    f"{step.name}: {column} is {row.get(column)!r} in epoch "
                    f"{row['epoch']} ({path}); a run whose numbers are not "
                    "finite is no result")


def write_tar(path, members):
    """An uncompressed tar of `members` ((a file or bytes, name inside)) at
    `path`, made in memory and written atomically."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for source, name in members:
            if isinstance(source, bytes):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(source), time.time()
                tar.addfile(info, io.BytesIO(source))
            else:
                tar.add(source, arcname=name)
    runfiles.write_file(path, buffer.getvalue())


def archive_run(out, step, folders, where):
    """The run's best weights, then its history and last weights (the
    second archive marks the run complete in `out`)."""
    paths = runfiles.Paths.of(step.name, folders.history, folders.weights)

    def members(*files):
        return [(p, folders.archived(p, where)) for p in files if p.exists()]

    write_tar(out / f"{step.name}.best.tar", members(paths.best))
    write_tar(out / f"{step.name}.tar",
              members(paths.csv, paths.json, paths.corrections, paths.last))


def archive_reports(out, folders, where, table):
    """summary.md (`table`), and reports.tar: the plots, bench.py's
    results and summary.md as plots/gpu-SLUG/SUMMARY_NAME."""
    data = table.encode()
    runfiles.write_file(out / "summary.md", data)
    files = sorted(p for folder in (folders.plots, folders.results)
                   if folder.is_dir() for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith("."))
    write_tar(out / "reports.tar",
              [(p, folders.archived(p, where)) for p in files]
              + [(data, f"plots/{where}/{SUMMARY_NAME}")])


def run_figures(step, folders):
    """A run's summary cells: epochs, mean training seconds per epoch
    (without each session's first where others exist), best validation
    accuracy, test accuracy of the best-validation and last weights."""
    rows = runfiles.read_rows(folders.history / f"{step.name}.csv")
    try:
        record = runfiles.read_json(folders.history / f"{step.name}.json")
    except (OSError, RuntimeError):
        record = {}
    firsts = {s.get("first_epoch") for s in record.get("sessions", [])} | {1}
    seconds = [float(r["seconds"]) for r in rows
               if int(r["epoch"]) not in firsts] or [
                   float(r["seconds"]) for r in rows]
    result = record.get("result", {})
    best_val = max((float(r["val_accuracy"]) for r in rows), default=None)
    return (f"{len(rows)}/{step.epochs}",
            text(sum(seconds) / len(seconds) if seconds else None, ".3f"),
            text(best_val, ".4f"),
            text(result.get("best_test_accuracy"), ".4f"),
            text(result.get("test_accuracy"), ".4f"))


def text(value, form):
    return "-" if value is None else format(value, form)


def summary(steps, folders, budget, device, notes):
    """The job's table (markdown): a row per step, the job's time, then
    what was skipped or stopped and why."""
    lines = [f"# {PROG} on {device}", "",
             ("| step | status | epochs | train s/epoch | best val acc | "
              "test acc (best-val weights) | test acc (last) | estimate s | "
              "wall s |"), "|" + " --- |" * 9]
    for step in steps:
        figures = run_figures(step, folders) if step.is_run else ("-",) * 5
        lines.append("| " + " | ".join(
            (step.name, step.status, *figures, text(step.estimate, ".0f"),
             text(step.wall, ".0f"))) + " |")
    budget_text = ("no budget" if budget.seconds is None
                   else f"a budget of {budget.seconds:g} s")
    lines += ["", (f"Job: {budget.elapsed():.0f} s, {budget_text}. Train "
                   "s/epoch: the mean of train.py's `seconds` (training "
                   "steps only) without each session's first epoch "
                   "(compilation).")]
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------ the job
class Job:
    """The steps in order, within the budget, copied to the output folder
    as they end."""

    def __init__(self, args, folders, where, device):
        self.args, self.folders, self.where = args, folders, where
        self.device = device
        self.budget = Budget(args.time_budget)
        self.costs = Costs({})
        self.steps, self.notes = [], []  # notes: what was skipped, stopped
        self.trained = 0  # runs started in this job (the first: the probe)

    def run(self, steps):
        """Every step that fits, in order; the job's exit code. Raises
        NotFinite after the first run whose losses are not finite."""
        self.steps = steps
        for step in steps:
            if step.is_run and runfiles.finished(
                    self.folders.history, step.name, step.epochs):
                print(f"{PROG}: {step.name}: finished, kept", flush=True)
                step.status = "kept"
            elif not self.starts(step):
                continue
            else:
                script, code = (self.run_training(step) if step.is_run
                                else self.run_bench(step))
                if code:
                    return self.failed(script, code)
            if step.is_run:
                try:
                    check_finite(step, self.folders)
                except NotFinite:
                    step.status = "not finite"
                    raise
            self.copy_out(step)
        if self.costs.plot is None:  # no run trained: plot the kept ones
            code = self.plot()
            if code:
                return self.failed("plot.py", code)
        self.copy_out()
        return 0

    def failed(self, script, code):
        print(f"{PROG}: {script} exited {code}; rerun the same command to "
              "continue (finished runs are kept)", file=sys.stderr)
        self.copy_out()
        return code

    def starts(self, step):
        """Whether `step` starts: the first run (the measurement) does, any
        step whose estimate fits the time left does; else a line names it."""
        left = self.budget.left()
        reckoned = estimate(step, self.costs, self.folders)
        if reckoned is not None:
            step.estimate = reckoned[0]
        if (step.is_run and not self.trained) or (
                reckoned is None and left > 0) or (
                    reckoned is not None and reckoned[0] <= left):
            return True
        why = ("nothing measured yet, and the budget is spent"
               if reckoned is None else
               f"needs about {reckoned[0]:.0f} s ({reckoned[1]}), "
               f"{max(left, 0):.0f} s of the budget left")
        step.status = "skipped"
        self.notes.append(f"skipped {step.name}: {why}")
        print(f"{PROG}: {self.notes[-1]}", flush=True)
        return False

    def run_bench(self, step):
        """The bench, stopped where the budget is spent (that is no
        failure): the script and its exit code."""
        code, step.wall, stopped = run_watched(step, lambda: (
            "the budget is spent" if self.budget.left() <= 0 else None))
        if stopped:
            step.status = "stopped"
            self.notes.append(f"stopped {step.name}: the budget was spent")
            return step.script, 0
        step.status = "finished" if not code else f"failed (exit {code})"
        return step.script, code

    def run_training(self, step):
        """A run, then plot.py: the program that failed and its exit code,
        or a code 0 (a stop for the budget included)."""
        code, cost, why = train(step, self.folders, self.budget, self.costs,
                                probe=not self.trained)
        self.trained += 1
        if cost is not None and (why or not code):
            self.costs.runs[step.norm] = cost
        if why:
            step.status = ("stopped after epoch "
                           f"{rows_done(step, self.folders)}")
            self.notes.append(f"stopped {step.name}: {why}")
        elif code:
            step.status = f"failed (exit {code})"
            return step.script, code
        else:
            step.status = "finished"
        return "plot.py", self.plot()

    def plot(self):
        plot = Step("plot.py", ["--history-dir", str(self.folders.history),
                                "--plots-dir", str(self.folders.plots)],
                    "plot.py")
        code, self.costs.plot, _ = run_watched(plot, lambda: None)
        return code

    def copy_out(self, step=None):
        """The finished run `step` (a kept one too) and the reports into
        --output-dir."""
        out = self.args.output_dir
        if out is None:
            return
        if step is not None and step.is_run and step.status in (
                "finished", "kept"):
            archive_run(out, step, self.folders, self.where)
        archive_reports(out, self.folders, self.where, self.table())

    def table(self):
        return summary(self.steps, self.folders, self.budget, self.device,
                       self.notes)


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        for key in ("data_dir", "history_dir", "weights_dir", "plots_dir",
                    "results_dir", "output_dir"):  # the scripts run in ROOT
            if getattr(args, key) is not None:
                setattr(args, key, getattr(args, key).resolve())
        if args.output_dir is not None:
            runfiles.writable_dir(args.output_dir, "output folder")
        name = gpu_name(args.tiny)
    except cli.UsageError as error:
        return cli.fail(PROG, error, 2)
    except NoGPU as error:
        return cli.fail(PROG, error, 1)
    where = "gpu-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    epochs = args.epochs or (TINY_EPOCHS if args.tiny
                             else protocols.PROTOCOLS["seed"].epochs)
    folders = Folders(*(folder / where for folder in (
        args.history_dir, args.weights_dir, args.plots_dir, args.results_dir)))
    print(f"{PROG}: device {name}; runs in {folders.history}"
          + (f"; budget {args.time_budget:g} s" if args.time_budget else "")
          + (f"; copies in {args.output_dir}" if args.output_dir else ""),
          flush=True)
    job = Job(args, folders, where, name)
    try:
        code = job.run(plan(args, folders, epochs))
    except NotFinite as error:
        job.copy_out()
        print(job.table(), end="", flush=True)
        return cli.fail(PROG, error, 1)
    except runfiles.WriteError as error:
        return cli.fail(PROG, error, 1)
    except KeyboardInterrupt:  # the step took the signal too, and saves
        return cli.fail(PROG, "interrupted; rerun the same command to "
                        "continue (finished runs are kept)", 130)
    print(job.table(), end="", flush=True)
    if args.output_dir is None:
        print(f"{PROG}: done")
        return code
    files = sorted(p.name for p in args.output_dir.iterdir()
                   if p.is_file() and not p.name.startswith("."))
    print(f"{PROG}: done; in {args.output_dir}: {', '.join(files)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
