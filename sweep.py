#!/usr/bin/env python3
"""Where batch renormalization matters: small and non-i.i.d. minibatches.
Trains a grid of train.py runs, resumably (rerun the same command), then
plot.py draws them; flags after `--` go to every run. Studies, presets and
their defaults, run names, examples: docs/sweep.md.
"""

import argparse
import itertools
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

from experiment import cli
from experiment.cifar10 import NUM_CLASSES
from experiment import runfiles
from models import NORMS

PROG = "sweep.py"
TRAIN = Path(__file__).resolve().parent / "train.py"  # run, not imported
PLOT = TRAIN.with_name("plot.py")
MICRO_BATCH = 128  # the microbatch study's batch: V = 128 is all of it
# Each study's defaults, then its presets' (docs/sweep.md; else train.py's).
STUDIES = {
    "batch": dict(batch_sizes=(4, 8, 32, 128), sampling=("iid", "k2"),
                  seeds=(0,), lr_milestones=()),
    "microbatch": dict(batch_sizes=(MICRO_BATCH,), sampling=("iid", "pairs")),
}
CPU = dict(depth=10, width=1, val_size=1000, renorm_schedule=(0.25, 0.5, 0.75))
GPU = dict(depth=16, width=4, momentum_images=12800,
           renorm_schedule=(0.04, 0.19, 0.31))  # the paper's 5k, 25k, 40k
PRESETS = {
    "batch": {"cpu": dict(CPU, train_size=1280, epochs=3, momentum_images=320),
              "gpu": dict(GPU, epochs=30)},
    "microbatch": {
        "cpu": dict(CPU, train_size=5000, epochs=10, lr_milestones=(8,),
                    momentum_images=2560, virtual_batch_sizes=(4, 128),
                    seeds=tuple(range(5))),
        "gpu": dict(GPU, epochs=4, lr_milestones=(3,),
                    virtual_batch_sizes=(2, 4, 8, 16, 128), seeds=(0, 1, 2))},
}


def sampling(text):
    if text in ("iid", "pairs") or re.fullmatch(r"k[1-9][0-9]*", text):
        return text
    raise argparse.ArgumentTypeError(
        f"must be iid, pairs or kN (N classes per batch, like k2): {text!r}")


# The grid's lists (nargs="+"), then each run's train.py flags: type, ...
GRID_FLAGS = {
    "--batch-sizes": (cli.positive_int, "N", "batch study only"),
    "--sampling": (sampling, "S", "iid, kN (N classes a batch) or pairs"),
    "--seeds": (cli.nonnegative_int, "SEED", "repeats of each run"),
    "--virtual-batch-sizes": (cli.positive_int, "V", "microbatch study only"),
}
RUN_FLAGS = {
    "--depth": (cli.wrn_depth, "D", None),
    "--width": (cli.positive_int, "K", None),
    "--train-size": (cli.positive_int, "N", "stratified training subset"),
    "--val-size": (cli.positive_int, "N", "held-out validation images"),
    "--epochs": (cli.positive_int, "N", None),
    "--lr": (cli.positive_float, "LR", "at every batch size"),
    "--lr-milestones": (cli.milestones, "E1,...", "the lr / 10 after each"),
    "--renorm-schedule": (cli.schedule_fractions, "W,D,R",
                          "warm-up end, d_max, r_max: fractions of the steps"),
    "--data-dir": (Path, "DIR", "CIFAR-10 folder (default: $CIFAR10_DIR)"),
}
# train.py flags that the sweep sets itself and `--` may not override.
OWN_FLAGS = (*RUN_FLAGS, "--norm", "--name", "--batch-size", "--seed",
             "--classes-per-batch", "--virtual-batch-size", "--sampling",
             "--norm-momentum", "--history-dir", "--weights-dir", "--resume",
             "--overwrite")


def build_parser():
    parser = cli.script_parser(PROG, __doc__)
    grid = parser.add_argument_group(
        "what to sweep (defaults: the study's and preset's, docs/sweep.md)")
    run = parser.add_argument_group("each run (train.py flags)")
    grid.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
    grid.add_argument("--study", choices=tuple(STUDIES), default="batch",
                      help=f"batch: batches of --batch-sizes; microbatch: "
                      f"batches of {MICRO_BATCH} normalized in groups of V")
    grid.add_argument("--norms", nargs="+", choices=NORMS, metavar="NORM",
                      default=list(NORMS), help=", ".join(NORMS))
    for group, flags, nargs in (grid, GRID_FLAGS, "+"), (run, RUN_FLAGS, None):
        for flag, (kind, metavar, text) in flags.items():
            group.add_argument(flag, nargs=nargs, type=kind, metavar=metavar,
                               help=text)
    momentum = run.add_mutually_exclusive_group()
    momentum.add_argument("--momentum-images", type=cli.positive_int,
                          metavar="IMAGES", help="momentum 1 - BATCH / IMAGES")
    momentum.add_argument("--norm-momentum", type=cli.fraction, metavar="M",
                          help="one momentum for all runs")
    output = parser.add_argument_group(
        "output (default: {history,weights,plots}/{sweep,microbatch})")
    for kind in ("history", "weights", "plots"):
        output.add_argument(f"--{kind}-dir", type=Path, metavar="DIR")
    output.add_argument("--dry-run", action="store_true",
                        help="list the runs' train.py commands; train nothing")
    return parser


def parse_args(argv):
    """The options, defaults filled in, and `extra`: the flags after `--`."""
    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    args.extra = argv[split + 1:]
    micro = args.study == "microbatch"
    wrong = [s for s in args.sampling or () if s not in ("iid", "pairs")]
    if not micro and args.virtual_batch_sizes is not None:
        raise cli.UsageError("--virtual-batch-sizes needs --study microbatch")
    if micro and args.batch_sizes is not None:
        raise cli.UsageError(
            "--batch-sizes is the batch study's; the microbatch study trains "
            f"every run at batch {MICRO_BATCH} and varies "
            "--virtual-batch-sizes")
    if micro and wrong:
        raise cli.UsageError(f"--sampling {wrong[0]} is the batch study's; "
                             "the microbatch study samples iid or pairs")
    folders = {f"{kind}_dir": Path(kind, "microbatch" if micro else "sweep")
               for kind in ("history", "weights", "plots")}
    for key, value in {**STUDIES[args.study], **folders,
                       **PRESETS[args.study][args.preset]}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if (args.norm_momentum is None
            and args.momentum_images <= max(args.batch_sizes)):
        raise cli.UsageError(
            f"--momentum-images {args.momentum_images} must be more than the "
            f"largest batch size, {max(args.batch_sizes)}")
    for flag in (text.split("=", 1)[0] for text in args.extra):
        if flag in OWN_FLAGS:
            raise cli.UsageError(
                f"{flag} after -- is set by {PROG} itself; use {PROG}'s own "
                f"flag (see {PROG} --help)")
    return args


def plan(args):
    """The runs as (name, train.py argv) and the notes of the combinations
    skipped; the microbatch study's seeds outermost (to cut it short)."""
    micro = args.study == "microbatch"
    grid = ((args.seeds, args.virtual_batch_sizes, args.sampling, args.norms)
            if micro else (args.batch_sizes, args.sampling, args.norms,
                           args.seeds))
    make = micro_run if micro else batch_run
    found = [make(args, *values) for values in itertools.product(*grid)]
    return (list(dict(f for f in found if not isinstance(f, str)).items()),
            list(dict.fromkeys(f for f in found if isinstance(f, str))))


def batch_run(args, batch_size, spec, norm, seed):
    """A run, (name, train.py argv), or the note why there is none."""
    classes = (None if spec == "iid" else batch_size // 2 if spec == "pairs"
               else int(spec[1:]))
    note = f"batch {batch_size}, {spec}: "
    if spec == "pairs" and batch_size % 2:
        return note + f"pairs need an even batch size, not {batch_size}"
    if classes and batch_size % classes:
        return note + (f"{classes} classes per batch do not divide batch "
                       f"size {batch_size}")
    if classes and classes > NUM_CLASSES:
        return note + (f"{classes} classes per batch are more than "
                       f"CIFAR-10's {NUM_CLASSES}")
    return run(args, f"sweep-{norm}-b{batch_size}-" + (
        f"k{classes}" if classes else "iid"), norm, batch_size, seed,
        classes=classes)


def micro_run(args, seed, virtual, spec, norm):
    """`batch_run` of the microbatch study."""
    if virtual > MICRO_BATCH:
        return f"V {virtual}: more than the batch, {MICRO_BATCH}"
    if spec == "pairs" and virtual % 2:
        return f"V {virtual}, pairs: a group of pairs needs an even V"
    if norm == "keras-renorm" and virtual != MICRO_BATCH:
        return (f"V {virtual}, keras-renorm: it has no virtual batches "
                f"(trained at V = {MICRO_BATCH} only)")
    return run(args, f"micro-{norm}-v{virtual}-{spec}", norm, MICRO_BATCH,
               seed, sampling=spec,  # keras-renorm's whole batch: none
               virtual=None if norm == "keras-renorm" else virtual)


def run(args, name, norm, batch_size, seed, classes=None, virtual=None,
        sampling=None):
    """A run: its name (NAME-sSEED for seeds other than 0) and its train.py
    flags, the sweep's own, then those after `--`."""
    name += f"-s{seed}" if seed else ""
    momentum = (round(1 - batch_size / args.momentum_images, 10)
                if args.norm_momentum is None else args.norm_momentum)
    lr_milestones = ",".join(map(str, args.lr_milestones)) or None
    flags = {
        "--norm": norm, "--name": name, "--batch-size": batch_size,
        "--classes-per-batch": classes, "--virtual-batch-size": virtual,
        "--sampling": sampling, "--epochs": args.epochs,
        "--depth": args.depth, "--width": args.width, "--seed": seed,
        "--train-size": args.train_size, "--val-size": args.val_size,
        "--lr": args.lr and f"{args.lr:g}", "--lr-milestones": lr_milestones,
        "--lr-gamma": lr_milestones and "0.1",
        "--norm-momentum": f"{momentum:.10g}",
        "--renorm-schedule": ",".join(f"{f:g}" for f in args.renorm_schedule),
        "--data-dir": args.data_dir, "--history-dir": args.history_dir,
        "--weights-dir": args.weights_dir}
    return name, [text for flag, value in flags.items() if value is not None
                  for text in (flag, str(value))] + ["--resume", *args.extra]


def train_command(argv):
    return shlex.join(["python", "train.py", *argv])


def run_script(script, argv):
    """Runs `python SCRIPT ARGV`, its output through ours unless on a
    terminal; passes a SIGTERM on (a Ctrl-C reaches it from the terminal)."""
    pipe = None if sys.stdout.isatty() else subprocess.PIPE
    process = subprocess.Popen([sys.executable, str(script), *argv],
                               stdout=pipe, stderr=pipe, text=True)
    previous = {signum: signal.signal(signum, handler) for signum, handler in (
        (signal.SIGINT, lambda *_: None),
        (signal.SIGTERM, lambda signum, _: process.send_signal(signum)))}
    try:
        if process.stdout:  # stderr is unbuffered, stdout flushed line by line
            errors = threading.Thread(target=sys.stderr.writelines,
                                      args=(process.stderr,))
            errors.start()
            for line in process.stdout:
                print(line, end="", flush=True)
            errors.join()
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def train_all(runs, done):
    """Trains the runs not `done`, in order; returns an exit code."""
    for number, (name, run_argv) in enumerate(runs, start=1):
        head = f"{PROG}: [{number}/{len(runs)}] {name}: "
        if name in done:
            print(head + "finished, skipped")
            continue
        print(head + train_command(run_argv), flush=True)
        code = run_script(TRAIN, run_argv)
        if code >= 128:
            print(f"{PROG}: interrupted in run {name}; rerun the same "
                  "command to continue", file=sys.stderr)
            return code
        if code:
            return cli.fail(
                PROG, f"run {name} failed (train.py exit {code}, see above); "
                "rerun the same command to continue once fixed (runs of "
                "other settings need another --history-dir)", code)
    return 0


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except cli.UsageError as error:
        return cli.fail(PROG, error, 2)
    runs, skipped = plan(args)
    for note in skipped:
        print(f"{PROG}: skipping {note}")
    if not runs:
        return cli.fail(PROG, "no run is possible with these " + (
            "--virtual-batch-sizes, --sampling and --norms"
            if args.study == "microbatch" else "--batch-sizes and --sampling"),
            2)
    done = [name for name, _ in runs
            if runfiles.finished(args.history_dir, name, args.epochs)]
    print(f"{PROG}: {len(runs)} runs ({len(done)} finished, "
          f"{len(runs) - len(done)} to train) in {args.history_dir}")
    if args.dry_run:
        for name, run_argv in runs:
            print(f"{name} ({'finished' if name in done else 'to train'}): "
                  + train_command(run_argv))
        return 0
    try:
        code = train_all(runs, done)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to continue",
              file=sys.stderr)
        return 130
    if code:
        return code
    print(f"{PROG}: all {len(runs)} runs finished; plotting every history "
          f"in {args.history_dir}", flush=True)
    return run_script(PLOT, ["--history-dir", str(args.history_dir),
                             "--plots-dir", str(args.plots_dir)])


if __name__ == "__main__":
    sys.exit(main())
