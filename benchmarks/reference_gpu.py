#!/usr/bin/env python3
"""The 2017 reproduction on a GPU in one command: the `seed` protocol with
batchnorm and renorm on JAX, bench.py's model level and plot.py, within a
time budget, each finished step copied out; --tiny: the same job in small,
on any device. The machine, steps, flags, budget and files: docs/gpu.md."""

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
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiment import cli, protocols, runfiles  # noqa: E402 (after the path)
import models  # noqa: E402

PROG = "reference_gpu.py"
# The 2017 comparison: Keras's BatchNormalization against this layer.
NORMS = tuple(norm for norm in models.NORMS if norm != "keras-renorm")
# --tiny: a minute or two on a CPU; 4 steps per execution: a compiled epoch.
TINY_EPOCHS = 3
TINY_FLAGS = ["--depth", "10", "--width", "1", "--train-size", "256",
              "--val-size", "100", "--batch-size", "32",
              "--eval-batch-size", "100", "--steps-per-execution", "4"]
TINY_BENCH = ["--depth", "10", "--width", "1", "--steps", "1", "--repeats",
              "2", "--batch-size", "16", "--variants", "batchnorm", "renorm"]
HOW_TO_GET_JAX = ("install a CUDA build of JAX first (pip install -U "
                  "'jax[cuda13]', or 'jax[cuda12]' for a CUDA 12 driver), "
                  "or run with --tiny on the CPU")
PROBE_EPOCHS = 3  # the first run's epochs that always run: one compiles
UNMEASURED = 1.35  # above the renorm / batchnorm epoch-time ratios on GPUs
BENCH_VARIANTS = 4  # bench.py --level model: each about a run's start-up
PLOT_GUESS = 10.0  # seconds of plot.py before it has run once
POLL = 0.25  # seconds between two looks at a run's CSV
STOP_WAIT = 120  # seconds a stopped step has to exit before it is killed
CONTINUES = "the same command continues it"
RERUN = "rerun the same command to continue (finished runs are kept)"


def absolute(text):
    return Path(text).resolve()  # the scripts run in ROOT


def build_parser():
    parser = cli.script_parser(PROG, __doc__)
    add = parser.add_argument
    add("--norms", nargs="+", choices=NORMS, default=list(NORMS),
        metavar="NORM")
    add("--seeds", nargs="+", type=cli.nonnegative_int, default=[0],
        metavar="SEED")
    add("--precision", choices=protocols.PRECISIONS, default="mixed_bfloat16")
    add("--epochs", type=cli.positive_int, help="default: the protocol's")
    add("--time-budget", type=cli.positive_float, metavar="SECONDS",
        help="start only the steps estimated to fit")
    add("--output-dir", type=absolute, metavar="DIR",
        help="copy each finished run and the reports into DIR")
    add("--tiny", action="store_true", help="the same job in small")
    for name, default in (("data", None), ("history", "history"),
                          ("weights", "weights"), ("plots", "plots"),
                          ("results", ROOT / "benchmarks" / "results")):
        add(f"--{name}-dir", type=absolute, default=default, metavar="DIR")
    add("--bench-repeats", type=cli.positive_int, default=5)
    return parser


def gpu_name(tiny):
    """(JAX's GPU, None), or (None, why this job cannot run here)."""
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        return None, (f"KERAS_BACKEND is {os.environ['KERAS_BACKEND']}; "
                      "this job runs on jax (unset it or set it to jax)")
    try:
        import jax
    except ImportError:
        return None, f"JAX is not installed; {HOW_TO_GET_JAX}"
    device = jax.devices()[0]
    if device.platform == "gpu" or tiny:
        return (device.device_kind if device.platform == "gpu" else "cpu",
                None)
    return None, (f"JAX sees no GPU (its devices: {device.platform}); "
                  f"{HOW_TO_GET_JAX}")


# Where the job's files go (each below gpu-SLUG), and their repository paths.
Folders = namedtuple("Folders", "history weights plots results")
IN_REPOSITORY = Folders("history", "weights", "plots", "benchmarks/results")


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
    cost: object = None  # a run's Cost that the estimate took
    wall: object = None  # seconds it ran in this job


def plan(args, folders, epochs):
    """The steps: the first seed's runs, the bench, the other seeds' runs."""
    extra = (TINY_FLAGS if args.tiny else []) + (
        ["--data-dir", str(args.data_dir)] if args.data_dir else [])
    runs = [Step("train.py", [
        "--norm", norm, "--protocol", "seed", "--seed", str(seed), "--name",
        f"{norm}-seed-s{seed}", "--val-from", "test", "--precision",
        args.precision, "--input", "device", "--history-dir",
        str(folders.history), "--weights-dir", str(folders.weights),
        "--resume", "--epochs", str(epochs), *extra],
        f"{norm}-seed-s{seed}", norm, epochs)
        for seed in args.seeds for norm in args.norms]
    bench = ["--backend", "jax", "--level", "model", "--dtype-policy",
             args.precision, "--results-dir", str(folders.results),
             *(TINY_BENCH if args.tiny else
               ["--repeats", str(args.bench_repeats)])]
    runs.insert(len(args.norms), Step("benchmarks/bench.py", bench, "bench"))
    return runs


# A run's seconds to its first new CSV row (start-up, compilation, an epoch),
# per epoch after that, and from its last row to its exit.
Cost = namedtuple("Cost", "start epoch end")


def rows_done(step, folders):
    """The epochs in the run's CSV (0 where caught unreadable mid-write)."""
    try:
        return len(runfiles.read_rows(folders.history / f"{step.name}.csv"))
    except (OSError, UnicodeDecodeError, csv.Error):
        return 0


def measured(seen, started, ended, finished):
    """A run's Cost from `seen`: (rows new in this job, time) at each CSV
    growth (an unfinished run's end: an epoch)."""
    if not seen:
        return None
    (first_rows, first), (last_rows, last) = seen[0], seen[-1]
    if last_rows > first_rows:
        epoch = (last - first) / (last_rows - first_rows)
    else:  # one look saw every row: the start-up's share is unknown
        epoch = (first - started) / first_rows
    start = max(first - started - (first_rows - 1) * epoch, epoch)
    return Cost(start, epoch, ended - last if finished else epoch)


def run_watched(step, why_stop):
    """Runs `step`, stopped (SIGTERM: train.py saves and exits) where
    `why_stop()` gives a reason; its exit code, seconds and the reason."""
    print(f"{PROG}: {shlex.join(['python', step.script, *step.argv])}",
          flush=True)
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / step.script), *step.argv], cwd=ROOT,
        env=dict(os.environ, KERAS_BACKEND="jax"))
    why = None
    while not why:
        try:
            return process.wait(POLL), time.monotonic() - started, None
        except subprocess.TimeoutExpired:
            why = why_stop()
    print(f"{PROG}: stopping {step.name}: {why}", flush=True)
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(STOP_WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    return code, time.monotonic() - started, why


def not_finite(step, folders):
    """A line naming the run's first loss or val_loss not finite, or None."""
    path = folders.history / f"{step.name}.csv"
    for row in runfiles.read_rows(path):
        for column in ("loss", "val_loss"):
            try:
                finite = math.isfinite(float(row.get(column) or "nan"))
            except ValueError:
                finite = False
            if not finite:
                return (f"{step.name}: {column} is {row.get(column)!r} in "
                        f"epoch {row['epoch']} ({path}); a run whose numbers "
                        "are not finite is no result")
    return None


def run_figures(step, folders):
    """A run's cells of the summary (docs/gpu.md says what each holds)."""
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


class Job:
    """The steps in order, within `budget` s, copied to `output_dir`."""

    def __init__(self, folders, device, budget=None, output_dir=None):
        self.folders, self.device = folders, device
        self.budget, self.output_dir = budget, output_dir
        self.started = time.monotonic()
        self.deadline = self.started + (budget or math.inf)
        self.costs, self.plot_seconds = {}, PLOT_GUESS  # runs' by norm
        self.steps, self.notes = [], []  # notes: what was skipped, stopped
        self.trained = 0  # runs started in this job (the first: the probe)

    def left(self):
        return self.deadline - time.monotonic()

    def run(self, steps):
        """Every step that fits, in order; the job's exit code."""
        self.steps = steps
        for step in steps:
            if step.norm and runfiles.finished(
                    self.folders.history, step.name, step.epochs):
                print(f"{PROG}: {step.name}: finished, kept", flush=True)
                step.status = "kept"
            elif not self.starts(step):
                continue
            else:
                script, code = self.run_step(step)
                if code:
                    return self.failed(f"{script} exited {code}; {RERUN}",
                                       code)
            error = step.norm and not_finite(step, self.folders)
            if error:
                step.status = "not finite"
                return self.failed(error, 1)
            self.copy_out(step)
        if not self.trained and (code := self.plot()):  # the kept runs
            return self.failed(f"plot.py exited {code}; {RERUN}", code)
        self.copy_out()
        return 0

    def failed(self, message, code):
        cli.fail(PROG, message, code)
        self.copy_out()
        return code

    def estimate(self, step):
        """Sets step.estimate in s (a run's also step.cost; docs/gpu.md); how
        it was reckoned, or None where nothing was measured yet."""
        if not self.costs:
            return None
        if not step.norm:
            start = max(cost.start for cost in self.costs.values())
            step.estimate = BENCH_VARIANTS * start
            return f"{BENCH_VARIANTS} variants x a run's start-up {start:.1f} s"
        cost, note = self.costs.get(step.norm), ""
        if cost is None:
            last = list(self.costs.values())[-1]
            cost = Cost(*(UNMEASURED * seconds for seconds in last))
            note = f", x{UNMEASURED:g} for a norm not measured yet"
        later = max(step.epochs - rows_done(step, self.folders) - 1, 0)
        step.cost, plot = cost, self.plot_seconds
        step.estimate = cost.start + later * cost.epoch + cost.end + plot
        return (f"start-up {cost.start:.1f} s + {later} epochs x "
                f"{cost.epoch:.2f} s + end {cost.end:.1f} s{note}, + plot "
                f"{plot:.1f} s")

    def starts(self, step):
        """Whether `step` starts (the probe, or one that fits); else a note."""
        left, how = self.left(), self.estimate(step)
        if (step.estimate <= left if how else left > 0) or (
                step.norm and not self.trained):
            return True
        why = (f"needs about {step.estimate:.0f} s ({how}), "
               f"{max(left, 0):.0f} s of the budget left" if how
               else "nothing measured yet, and the budget is spent")
        step.status = "skipped"
        self.notes.append(f"skipped {step.name}: {why}")
        print(f"{PROG}: {self.notes[-1]}", flush=True)
        return False

    def run_step(self, step):
        """A run (its Cost noted) then plot.py, or the bench: the program
        that failed and its exit code, or a code 0 (a stop for the budget is
        no failure; when a run stops: docs/gpu.md)."""
        probe, before = not self.trained, rows_done(step, self.folders)
        seen, started = [], time.monotonic()

        def look(now):  # notes (rows new in this job, now) if the CSV grew
            new = rows_done(step, self.folders) - before
            if new <= (seen[-1][0] if seen else 0):
                return False
            seen.append((new, now))
            return True

        def overrun():  # why the step should stop, or None
            if not step.norm:
                return "the budget is spent" if self.left() <= 0 else None
            if not look(time.monotonic()) and self.left() > 0:
                return None
            new = seen[-1][0] if seen else 0
            to_go, left = step.epochs - before - new, self.left()
            if to_go <= 0 or (probe and new < PROBE_EPOCHS):
                return None
            if left <= 0:
                return (f"the budget is spent, {before + new} of "
                        f"{step.epochs} epochs done; {CONTINUES}")
            pace = (measured(seen, started, time.monotonic(), False)
                    if len(seen) > 1 else step.cost)
            needed = pace and to_go * pace.epoch + pace.end + self.plot_seconds
            if not needed or needed <= left:
                return None
            return (f"its {to_go} epochs to go need about {needed:.0f} s "
                    f"({pace.epoch:.2f} s an epoch), {left:.0f} s of the "
                    f"budget left; {CONTINUES}")

        code, step.wall, why = run_watched(step, overrun)
        if step.norm:
            look(started + step.wall)
            self.trained += 1
            cost = measured(seen, started, started + step.wall,
                            why is None and code == 0)
            if cost is not None and (why or not code):
                self.costs[step.norm] = cost
        if why:
            step.status = "stopped" + (
                f" after epoch {rows_done(step, self.folders)}"
                if step.norm else "")
            self.notes.append(f"stopped {step.name}: {why}")
        elif code:
            step.status = f"failed (exit {code})"
            return step.script, code
        else:
            step.status = "finished"
        return ("plot.py", self.plot()) if step.norm else (step.script, 0)

    def plot(self):
        plot = Step("plot.py", ["--history-dir", str(self.folders.history),
                                "--plots-dir", str(self.folders.plots)],
                    "plot.py")
        code, self.plot_seconds, _ = run_watched(plot, lambda: None)
        return code

    def copy_out(self, step=None):
        """Copies out the finished (or kept) run `step`, summary, reports."""
        if self.output_dir is None:
            return
        out, folders = self.output_dir, self.folders
        if step is not None and step.norm and step.status in (
                "finished", "kept"):
            paths = runfiles.Paths.of(step.name, folders.history,
                                      folders.weights)
            self.write_tar(out / f"{step.name}.best.tar", [paths.best])
            self.write_tar(out / f"{step.name}.tar", [
                paths.csv, paths.json, paths.corrections, paths.last])
        table = self.table().encode()
        runfiles.write_file(out / "summary.md", table)
        self.write_tar(out / "reports.tar", sorted(
            p for folder in (folders.plots, folders.results)
            for p in folder.glob("[!.]*") if p.is_file()), table)

    def write_tar(self, path, files, summary=None):
        """A tar of the `files` that exist and `summary`, at their paths."""

        def archived(file):
            folder = IN_REPOSITORY[self.folders.index(file.parent)]
            return f"{folder}/{file.parent.name}/{file.name}"

        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for file in files:
                if file.exists():
                    tar.add(file, arcname=archived(file))
            if summary is not None:
                info = tarfile.TarInfo(  # summary.md
                    archived(self.folders.plots / "reference_gpu.md"))
                info.size, info.mtime = len(summary), time.time()
                tar.addfile(info, io.BytesIO(summary))
        runfiles.write_file(path, buffer.getvalue())

    def table(self):
        """summary.md (docs/gpu.md says what it holds)."""
        lines = [f"# {PROG} on {self.device}", "",
                 ("| step | status | epochs | train s/epoch | best val acc | "
                  "test acc (best-val weights) | test acc (last) | "
                  "estimate s | wall s |"), "|" + " --- |" * 9]
        for step in self.steps:
            figures = (run_figures(step, self.folders) if step.norm
                       else ("-",) * 5)
            lines.append("| " + " | ".join(
                (step.name, step.status, *figures, text(step.estimate, ".0f"),
                 text(step.wall, ".0f"))) + " |")
        budget = ("no budget" if self.budget is None
                  else f"a budget of {self.budget:g} s")
        elapsed = time.monotonic() - self.started
        lines += ["", f"Job: {elapsed:.0f} s, {budget}. Columns: docs/gpu.md."]
        if self.notes:
            lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        if args.output_dir is not None:
            runfiles.writable_dir(args.output_dir, "output folder")
    except cli.UsageError as error:
        return cli.fail(PROG, error, 2)
    name, problem = gpu_name(args.tiny)
    if problem:
        return cli.fail(PROG, problem, 1)
    where = "gpu-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    epochs = args.epochs or (TINY_EPOCHS if args.tiny
                             else protocols.PROTOCOLS["seed"].epochs)
    folders = Folders(*(folder / where for folder in (
        args.history_dir, args.weights_dir, args.plots_dir, args.results_dir)))
    print(f"{PROG}: device {name}; runs in {folders.history}"
          + (f"; budget {args.time_budget:g} s" if args.time_budget else "")
          + (f"; copies in {args.output_dir}" if args.output_dir else ""),
          flush=True)
    job = Job(folders, name, args.time_budget, args.output_dir)
    try:
        code = job.run(plan(args, folders, epochs))
    except runfiles.WriteError as error:
        return cli.fail(PROG, error, 1)
    except KeyboardInterrupt:  # the step took the signal too, and saves
        return cli.fail(PROG, f"interrupted; {RERUN}", 130)
    print(job.table(), end="", flush=True)
    out = args.output_dir
    files = out and sorted(p.name for p in out.glob("[!.]*") if p.is_file())
    print(f"{PROG}: done" + (f"; in {out}: {', '.join(files)}" if out else ""))
    return code


if __name__ == "__main__":
    sys.exit(main())
