#!/usr/bin/env python3
"""Where batch renormalization matters: small and non-i.i.d. minibatches.

Two studies (--study). `batch` (the default): trains every combination of
normalization (--norms), batch size (--batch-sizes) and sampling
(--sampling) with train.py, one run each, named sweep-NORM-bBATCH-SAMPLING
(iid, or kK for K classes per batch; -sSEED added for seeds other than 0),
in --history-dir; then draws them all with plot.py into --plots-dir
(accuracy against batch size, the non-i.i.d. comparison, timing.md with the
results table).

`microbatch`, the paper's design (Ioffe 2017, section 4): the optimizer's
batch stays 128 and only the normalization shrinks, to groups of V
consecutive examples (train.py --virtual-batch-size V) for every V of
--virtual-batch-sizes (V = 128: the whole batch), with i.i.d. batches and
the paper's pairs (train.py --sampling pairs: pairs of images of a class,
V/2 distinct classes in each group), for batchnorm (exact batch
normalization of each group) and renorm, and keras-renorm where it applies
(V = 128 only: it has no virtual batches), over several --seeds; runs
micro-NORM-vV-SAMPLING(-sSEED), by default in history/microbatch. plot.py
then draws accuracy against V and the accuracy each norm loses, and
timing.md holds the table per cell and the paired differences renorm -
batchnorm with their 95% intervals.

  python sweep.py                  # the reduced version, for a CPU (defaults)
  python sweep.py --preset gpu     # the full version, for a GPU
  python sweep.py --dry-run        # the runs and their train.py commands
  python sweep.py --batch-sizes 4 32 --norms batchnorm renorm -- --augment
  python sweep.py --study microbatch               # 50 runs, about 80 minutes on 2 CPUs
  python sweep.py --study microbatch --preset gpu  # about 8 minutes, an H100

Sampling, batch study: `iid` is train.py's usual batches (a random
permutation each epoch); `kN` builds every batch from N classes (train.py
--classes-per-batch N); `pairs` from pairs of images of one class, as in the
paper (K = batch size / 2). A combination that cannot be made (K does not
divide the batch size, or K is more than CIFAR-10's 10 classes) is skipped
with a note. Microbatch study: `iid` or `pairs` (train.py --sampling).

Every run uses the same optimizer and learning rate (the `seed` protocol's
Adam, lr 1e-3, unless --lr, or --protocol after `--`, says otherwise; the
microbatch presets divide it by 10 for the last epochs, --lr-milestones):
the learning rate is not scaled with the batch size. The renorm schedule is given as
fractions of each run's own steps (--renorm-schedule, default the paper's
5k/25k/40k of 130k steps), so every batch size gets the same shape of
schedule. The moving statistics average over the same number of images at
every batch size: norm momentum = 1 - BATCH / --momentum-images (or a fixed
--norm-momentum). Each run's history JSON records what it used.

Resumable: a run whose history has all its epochs is skipped, any other is
started or continued (train.py --resume); rerun the same command after an
interruption. Flags after `--` go to every train.py run.
"""

import argparse
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

from experiment import runfiles
from experiment.cli import Parser
from experiment.cli import UsageError
from experiment.cli import fail
from experiment.cli import fraction
from experiment.cli import milestones
from experiment.cli import nonnegative_int
from experiment.cli import positive_float
from experiment.cli import positive_int
from experiment.cli import schedule_fractions
from experiment.cli import wrn_depth
from experiment.protocols import NORMS

PROG = "sweep.py"
TRAIN = Path(__file__).resolve().parent / "train.py"  # run, not imported
PLOT = TRAIN.with_name("plot.py")
NUM_CLASSES = 10  # CIFAR-10
PAPER_SCHEDULE = "0.04,0.19,0.31"  # 5k, 25k, 40k of the paper's 130k steps
PRESETS = {
    # A reduced version that 2 CPU cores finish in well under an hour (24
    # runs in about 25 minutes on TensorFlow): WRN-10-1, 1280 images (128 of
    # each class, so that every batch of every default size, i.i.d. or 2
    # classes per batch, is full), 3 epochs. Moving statistics over about 320
    # images (0.6 at batch 128, 0.9875 at batch 4), and the renorm warm-up
    # over the first quarter of the steps, about 3 time constants of those
    # averages: the paper's 4% would end before they settle in so short a
    # run, and r, d would then correct towards stale statistics.
    "cpu": dict(depth=10, width=1, train_size=1280, val_size=1000, epochs=3,
                momentum_images=320, renorm_schedule="0.25,0.5,0.75"),
    # The full version: WRN-16-4 (the reference network), the 45,000
    # training images that train.py does not hold out for validation (5,000);
    # the moving
    # averages of Keras's default momentum 0.99 at batch 128, and the
    # paper's schedule as fractions of each run's steps.
    "gpu": dict(depth=16, width=4, train_size=None, val_size=None, epochs=30,
                momentum_images=12800, renorm_schedule=PAPER_SCHEDULE),
}
BATCH_SIZES = (4, 8, 32, 128)
SAMPLINGS = ("iid", "k2")
# The microbatch study: the optimizer's batch is fixed, the normalization
# group (virtual batch) V varies; V = MICRO_BATCH is the whole batch.
MICRO_BATCH = 128
MICRO_SAMPLINGS = ("iid", "pairs")
MICRO_PRESETS = {
    # Sized by the 95% intervals of paired differences, not by the grid
    # (docs/sweep.md): on 2 CPU cores a WRN-16-1 run of 5000 images took
    # about 200 s and two seeds of one cell differed by up to 7 points, so
    # WRN-10-1, two values of V, and five seeds instead of three: 50 runs,
    # measured 102-106 s each for batchnorm and renorm (at V = 128 too: on
    # TensorFlow the batch size is unknown in the graph, so the layer takes
    # its grouped path), about 60 s for keras-renorm: about 80 minutes.
    # 5000 images (500 of each class: every pair used) for 10 epochs, 400
    # steps: about 50% test accuracy, still rising. The lr drops tenfold for
    # the last two epochs, so that the last weights are not one noisy Adam
    # step among others (a seed's last epoch moved by 5 points without it).
    # Moving statistics over 2560 images (momentum 0.95, a time constant of
    # 20 steps) and the warm-up over the first quarter (100 steps, 5 time
    # constants).
    "cpu": dict(depth=10, width=1, train_size=5000, val_size=1000, epochs=10,
                lr_milestones=(8,), momentum_images=2560,
                renorm_schedule="0.25,0.5,0.75",
                virtual_batch_sizes=(4, 128), seeds=tuple(range(5))),
    # WRN-16-4 on the 45,000 training images not held out (352 steps an
    # epoch), the grid of V, 3 seeds: 66 runs of 4 epochs, about
    # 66 x 4 x 1.8 s = 8 minutes of training steps on an H100 (2 s per
    # epoch of 391 steps with JAX), start-up and evaluation not counted.
    # Keras's momentum 0.99 at batch 128 and the paper's schedule, as the
    # batch study's gpu preset; the lr tenfold lower in the last epoch.
    "gpu": dict(depth=16, width=4, train_size=None, val_size=None, epochs=4,
                lr_milestones=(3,), momentum_images=12800,
                renorm_schedule=PAPER_SCHEDULE,
                virtual_batch_sizes=(2, 4, 8, 16, 128), seeds=(0, 1, 2)),
}
STUDIES = ("batch", "microbatch")
# Where each study's runs and figures go (history/NAME, weights/NAME,
# plots/NAME).
STUDY_DIRS = {"batch": "sweep", "microbatch": "microbatch"}
# train.py flags that the sweep sets itself and `--` may not override.
OWN_FLAGS = ("--norm", "--name", "--batch-size", "--classes-per-batch",
             "--history-dir", "--weights-dir", "--resume", "--overwrite",
             "--seed", "--epochs", "--depth", "--width", "--train-size",
             "--val-size", "--norm-momentum", "--renorm-schedule", "--lr",
             "--data-dir", "--virtual-batch-size", "--sampling",
             "--lr-milestones")


def sampling(text):
    if text in ("iid", "pairs") or re.fullmatch(r"k[1-9][0-9]*", text):
        return text
    raise argparse.ArgumentTypeError(
        f"must be iid, pairs or kN (N classes per batch, like k2): {text!r}")


def build_parser():
    parser = Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_flags(parser)
    add_microbatch_flags(parser)
    add_run_flags(parser)
    add_output_flags(parser)
    return parser


def add_sweep_flags(parser):
    preset = parser.add_argument_group(
        "what to sweep (defaults: the preset's)")
    preset.add_argument(
        "--preset", choices=tuple(PRESETS), default="cpu",
        help="cpu: WRN-{cpu_depth}-{cpu_width}, {cpu_train} training "
        "images, {cpu_val} validation images, {cpu_epochs} epochs; gpu: "
        "WRN-{gpu_depth}-{gpu_width}, all 45000 training images and 5000 "
        "held out, {gpu_epochs} epochs (default: cpu)".format(
            cpu_depth=PRESETS["cpu"]["depth"],
            cpu_width=PRESETS["cpu"]["width"],
            cpu_train=PRESETS["cpu"]["train_size"],
            cpu_val=PRESETS["cpu"]["val_size"],
            cpu_epochs=PRESETS["cpu"]["epochs"],
            gpu_depth=PRESETS["gpu"]["depth"],
            gpu_width=PRESETS["gpu"]["width"],
            gpu_epochs=PRESETS["gpu"]["epochs"])
        + "; with --study microbatch: " + "; ".join(
            f"{name}: WRN-{p['depth']}-{p['width']}, "
            f"{p['train_size'] or 'all 45000'} training images, "
            f"{p['epochs']} epochs, V {' '.join(map(str, p['virtual_batch_sizes']))}, "
            f"seeds {' '.join(map(str, p['seeds']))}"
            for name, p in MICRO_PRESETS.items()))
    preset.add_argument("--study", choices=STUDIES, default="batch",
                        help="batch: real batches of --batch-sizes; "
                        "microbatch: the paper's design, batch 128 "
                        "normalized in virtual batches of "
                        "--virtual-batch-sizes (default: batch)")
    preset.add_argument("--norms", nargs="+", choices=NORMS,
                        default=list(NORMS), metavar="NORM",
                        help="normalizations: " + ", ".join(NORMS)
                        + " (default: all three; keras-renorm has no "
                        "virtual batches, so the microbatch study trains it "
                        f"at V = {MICRO_BATCH} only)")
    preset.add_argument("--batch-sizes", nargs="+", type=positive_int,
                        metavar="N",
                        help="batch study only; default: "
                        + " ".join(map(str, BATCH_SIZES)))
    preset.add_argument("--sampling", nargs="+", type=sampling,
                        metavar="S",
                        help="iid, kN (N classes per batch) or pairs (K = "
                        "batch size / 2); default: " + " ".join(SAMPLINGS)
                        + ". Microbatch study: iid or pairs (train.py "
                        "--sampling pairs: V/2 distinct classes in each "
                        "group); default: " + " ".join(MICRO_SAMPLINGS))
    preset.add_argument("--seeds", nargs="+", type=nonnegative_int,
                        metavar="SEED",
                        help="repeats of each run (default: 0; microbatch: "
                        "the preset's)")


def add_microbatch_flags(parser):
    micro = parser.add_argument_group(
        "the microbatch study (--study microbatch)")
    micro.add_argument("--virtual-batch-sizes", nargs="+", type=positive_int,
                       metavar="V",
                       help="normalization groups (train.py "
                       f"--virtual-batch-size), each at most {MICRO_BATCH}, "
                       f"the batch; V = {MICRO_BATCH} is the whole batch "
                       "(passed as such, so that the history records it; "
                       "keras-renorm records none) (default: the preset's, "
                       + "; ".join(
                           f"{name}: "
                           + " ".join(map(str, p["virtual_batch_sizes"]))
                           for name, p in MICRO_PRESETS.items()) + ")")


def add_run_flags(parser):
    run = parser.add_argument_group("each run (train.py flags)")
    run.add_argument("--depth", type=wrn_depth, metavar="D")
    run.add_argument("--width", type=positive_int, metavar="K")
    run.add_argument("--train-size", type=positive_int, metavar="N",
                     help="stratified training subset (gpu preset: all)")
    run.add_argument("--val-size", type=positive_int, metavar="N",
                     help="validation images held out of the training set "
                     "(train.py's --val-from train; gpu preset: its "
                     "default, 5000); `-- --val-from test` validates on "
                     "test images as in 2017")
    run.add_argument("--epochs", type=positive_int, metavar="N")
    run.add_argument("--lr", type=positive_float,
                     help="the learning rate of every run, whatever its batch "
                     "size (default: the seed protocol's, 1e-3)")
    run.add_argument("--lr-milestones", type=milestones, metavar="E1,...",
                     help="epochs after which the lr is divided by 10 "
                     "(train.py --lr-milestones, --lr-gamma 0.1; default: "
                     "none; microbatch cpu preset: "
                     f"{','.join(map(str, MICRO_PRESETS['cpu']['lr_milestones']))}"
                     ", gpu: "
                     f"{','.join(map(str, MICRO_PRESETS['gpu']['lr_milestones']))})")
    run.add_argument("--renorm-schedule", type=schedule_fractions,
                     metavar="W,D,R",
                     help="renorm's warm-up end, d_max and r_max steps as "
                     "fractions of each run's steps (cpu preset: "
                     f"{PRESETS['cpu']['renorm_schedule']}; gpu: "
                     f"{PAPER_SCHEDULE}, the paper's 5k, 25k, 40k of 130k; "
                     "microbatch: cpu "
                     f"{MICRO_PRESETS['cpu']['renorm_schedule']}, gpu "
                     f"{MICRO_PRESETS['gpu']['renorm_schedule']})")
    momentum = run.add_mutually_exclusive_group()
    momentum.add_argument("--momentum-images", type=positive_int,
                          metavar="IMAGES",
                          help="norm momentum 1 - BATCH / IMAGES, so that the "
                          "moving statistics average over about the same "
                          "number of images at every batch size (cpu preset: "
                          f"{PRESETS['cpu']['momentum_images']}, i.e. 0.6 at "
                          f"batch 128; gpu: "
                          f"{PRESETS['gpu']['momentum_images']}, i.e. 0.99; "
                          "microbatch, one batch size: cpu "
                          f"{MICRO_PRESETS['cpu']['momentum_images']}, i.e. "
                          f"{preset_momentum(MICRO_PRESETS['cpu']):g}; gpu "
                          f"{MICRO_PRESETS['gpu']['momentum_images']}, i.e. "
                          f"{preset_momentum(MICRO_PRESETS['gpu']):g})")
    momentum.add_argument("--norm-momentum", type=fraction,
                          metavar="M", help="one norm momentum for all runs")
    run.add_argument("--data-dir", type=Path, metavar="DIR",
                     help="CIFAR-10 folder (default: $CIFAR10_DIR)")


def add_output_flags(parser):
    output = parser.add_argument_group("output")
    for kind in ("history", "weights", "plots"):
        output.add_argument(
            f"--{kind}-dir", type=Path, metavar="DIR",
            help=f"default: {kind}/{STUDY_DIRS['batch']} (microbatch study: "
            f"{kind}/{STUDY_DIRS['microbatch']})")
    output.add_argument("--dry-run", action="store_true",
                        help="list the runs and their train.py commands; "
                        "train nothing")


def parse_args(argv):
    """The options, with the preset's values filled in, and the train.py
    flags given after `--`."""
    argv = list(argv)
    extra = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1:]
    args = build_parser().parse_args(argv)
    micro = args.study == "microbatch"
    check_study_flags(args)
    preset = (MICRO_PRESETS if micro else PRESETS)[args.preset]
    defaults = dict(lr_milestones=(), seeds=[0], batch_sizes=BATCH_SIZES,
                    sampling=SAMPLINGS)
    if micro:
        defaults.update(batch_sizes=[MICRO_BATCH], sampling=MICRO_SAMPLINGS)
    for key, value in {**defaults, **preset}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, list(value) if isinstance(value, tuple)
                    else value)
    for kind in ("history", "weights", "plots"):
        if getattr(args, f"{kind}_dir") is None:
            setattr(args, f"{kind}_dir",
                    Path(kind) / STUDY_DIRS[args.study])
    if isinstance(args.renorm_schedule, str):
        args.renorm_schedule = schedule_fractions(args.renorm_schedule)
    if args.norm_momentum is not None:
        args.momentum_images = None
    elif args.momentum_images <= max(args.batch_sizes):
        raise UsageError(
            f"--momentum-images {args.momentum_images} must be more than the "
            f"largest batch size, {max(args.batch_sizes)}")
    for flag in extra:
        if flag.split("=", 1)[0] in OWN_FLAGS:
            raise UsageError(
                f"{flag.split('=', 1)[0]} after -- is set by {PROG} itself; "
                f"use {PROG}'s own flag (see {PROG} --help)")
    args.extra = extra
    return args


def check_study_flags(args):
    """Each study's own flags, refused with the other."""
    if args.study == "microbatch":
        if args.batch_sizes is not None:
            raise UsageError(
                "--batch-sizes is the batch study's; the microbatch study "
                f"trains every run at batch {MICRO_BATCH} and varies "
                "--virtual-batch-sizes")
        wrong = [s for s in args.sampling or () if s not in MICRO_SAMPLINGS]
        if wrong:
            raise UsageError(
                f"--sampling {wrong[0]} is the batch study's; the microbatch "
                "study samples " + " or ".join(MICRO_SAMPLINGS))
    elif args.virtual_batch_sizes is not None:
        raise UsageError("--virtual-batch-sizes needs --study microbatch")


def classes_per_batch(spec, batch_size):
    """K for a sampling spec at a batch size (None for iid), and why the
    combination is impossible (None if it is possible)."""
    if spec == "iid":
        return None, None
    if spec == "pairs":
        if batch_size % 2:
            return None, f"pairs need an even batch size, not {batch_size}"
        classes = batch_size // 2
    else:
        classes = int(spec[1:])
    if batch_size % classes:
        return classes, (f"{classes} classes per batch do not divide batch "
                         f"size {batch_size}")
    if classes > NUM_CLASSES:
        return classes, (f"{classes} classes per batch are more than "
                         f"CIFAR-10's {NUM_CLASSES}")
    return classes, None


def run_name(norm, batch_size, classes, seed):
    return (f"sweep-{norm}-b{batch_size}-"
            + ("iid" if classes is None else f"k{classes}")
            + (f"-s{seed}" if seed else ""))


def preset_momentum(preset):
    """A microbatch preset's norm momentum, at its one batch size."""
    return 1 - MICRO_BATCH / preset["momentum_images"]


def micro_name(norm, virtual, spec, seed):
    return f"micro-{norm}-v{virtual}-{spec}" + (f"-s{seed}" if seed else "")


def momentum_for(args, batch_size):
    if args.norm_momentum is not None:
        return args.norm_momentum
    return round(1 - batch_size / args.momentum_images, 10)


def plan(args):
    """The runs as (name, train.py argv), and the skipped combinations."""
    if args.study == "microbatch":
        return micro_plan(args)
    runs, skipped, seen = [], [], set()
    for batch_size in args.batch_sizes:
        for spec in args.sampling:
            classes, why = classes_per_batch(spec, batch_size)
            if why:
                skipped.append(f"batch {batch_size}, {spec}: {why}")
                continue
            for norm in args.norms:
                for seed in args.seeds:
                    name = run_name(norm, batch_size, classes, seed)
                    if name in seen:
                        continue
                    seen.add(name)
                    runs.append((name, train_argv(args, name, norm,
                                                  batch_size, classes, seed)))
    return runs, skipped


def micro_plan(args):
    """The microbatch study's runs, seed by seed (so that a study cut short
    holds whole seeds, each cell paired), then V, sampling and norm; and
    the combinations skipped (keras-renorm below the whole batch, V beyond
    it, an odd V with pairs), each said once."""
    runs, skipped = [], {}
    for seed in dict.fromkeys(args.seeds):
        for virtual in dict.fromkeys(args.virtual_batch_sizes):
            if virtual > MICRO_BATCH:
                skipped[virtual] = (f"V {virtual}: more than the batch, "
                                    f"{MICRO_BATCH}")
                continue
            for spec in dict.fromkeys(args.sampling):
                if spec == "pairs" and virtual % 2:
                    skipped[virtual, spec] = (
                        f"V {virtual}, pairs: a group of pairs needs an even "
                        "V")
                    continue
                for norm in args.norms:
                    if norm == "keras-renorm" and virtual != MICRO_BATCH:
                        skipped[virtual, norm] = (
                            f"V {virtual}, keras-renorm: it has no virtual "
                            f"batches (trained at V = {MICRO_BATCH} only)")
                        continue
                    name = micro_name(norm, virtual, spec, seed)
                    runs.append((name, train_argv(
                        args, name, norm, MICRO_BATCH, None, seed,
                        # keras-renorm's whole batch is recorded as none.
                        virtual=None if norm == "keras-renorm" else virtual,
                        sampling=spec)))
    return runs, list(skipped.values())


def train_argv(args, name, norm, batch_size, classes, seed, virtual=None,
               sampling=None):
    argv = ["--norm", norm, "--name", name, "--batch-size", str(batch_size)]
    if classes is not None:
        argv += ["--classes-per-batch", str(classes)]
    if virtual is not None:
        argv += ["--virtual-batch-size", str(virtual)]
    if sampling is not None:
        argv += ["--sampling", sampling]
    argv += ["--epochs", str(args.epochs), "--depth", str(args.depth),
             "--width", str(args.width), "--seed", str(seed)]
    if args.train_size:
        argv += ["--train-size", str(args.train_size)]
    if args.val_size:
        argv += ["--val-size", str(args.val_size)]
    if args.lr:
        argv += ["--lr", f"{args.lr:g}"]
    if args.lr_milestones:
        argv += ["--lr-milestones", ",".join(map(str, args.lr_milestones)),
                 "--lr-gamma", "0.1"]
    argv += ["--norm-momentum", f"{momentum_for(args, batch_size):.10g}",
             "--renorm-schedule",
             ",".join(f"{f:g}" for f in args.renorm_schedule)]
    if args.data_dir:
        argv += ["--data-dir", str(args.data_dir)]
    argv += ["--history-dir", str(args.history_dir),
             "--weights-dir", str(args.weights_dir), "--resume", *args.extra]
    return argv


def run_script(script, argv):
    """Runs `python SCRIPT ARGV` (train.py, plot.py) in its own process (a
    fresh Keras session for each run) and returns its exit code. On a
    terminal it writes there itself, progress bar included; else its output goes line by line through
    this process's sys.stdout and sys.stderr. A Ctrl-C reaches it from the
    terminal and a SIGTERM is passed on to it: it saves its last epoch,
    exits 128 + the signal, and so does the sweep."""
    piped = not sys.stdout.isatty()
    pipe = subprocess.PIPE if piped else None
    process = subprocess.Popen([sys.executable, str(script), *argv],
                               stdout=pipe, stderr=pipe, text=True)
    handlers = {signal.SIGINT: lambda signum, frame: None,
                signal.SIGTERM: lambda signum, frame: process.send_signal(
                    signum)}
    previous = ({s: signal.signal(s, h) for s, h in handlers.items()}
                if threading.current_thread() is threading.main_thread()
                else {})
    try:
        forwards = [threading.Thread(target=forward, args=(source, target))
                    for source, target in ((process.stdout, sys.stdout),
                                           (process.stderr, sys.stderr))
                    if piped]
        for thread in forwards:
            thread.start()
        for thread in forwards:
            thread.join()
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def forward(source, target):
    for line in source:
        target.write(line)
        target.flush()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except UsageError as error:
        return fail(PROG, error, 2)
    runs, skipped = plan(args)
    for note in skipped:
        print(f"{PROG}: skipping {note}")
    if not runs:
        return fail(PROG, "no run is possible with these "
                    + ("--virtual-batch-sizes, --sampling and --norms"
                       if args.study == "microbatch"
                       else "--batch-sizes and --sampling"), 2)
    done = [name for name, _ in runs
            if runfiles.finished(args.history_dir, name, args.epochs)]
    print(f"{PROG}: {len(runs)} runs ({len(done)} finished, "
          f"{len(runs) - len(done)} to train) in {args.history_dir}")
    if args.dry_run:
        for name, run_argv in runs:
            state = "finished" if name in done else "to train"
            command = shlex.join(["python", "train.py", *run_argv])
            print(f"{name} ({state}): {command}")
        return 0
    try:
        for number, (name, run_argv) in enumerate(runs, start=1):
            if name in done:
                print(f"{PROG}: [{number}/{len(runs)}] {name}: finished, "
                      "skipped")
                continue
            print(f"{PROG}: [{number}/{len(runs)}] {name}: "
                  f"{shlex.join(['python', 'train.py', *run_argv])}",
                  flush=True)
            code = run_script(TRAIN, run_argv)
            if code >= 128:
                print(f"{PROG}: interrupted in run {name}; rerun the same "
                      "command to continue", file=sys.stderr)
                return code
            if code:
                return fail(PROG, f"run {name} failed (train.py exit "
                            f"{code}, see above); rerun the same command to "
                            "continue once fixed (runs of other settings "
                            "need another --history-dir)", code)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to continue",
              file=sys.stderr)
        return 130
    print(f"{PROG}: all {len(runs)} runs finished; plotting every history "
          f"in {args.history_dir}", flush=True)
    return run_script(PLOT, ["--history-dir", str(args.history_dir),
                             "--plots-dir", str(args.plots_dir)])


if __name__ == "__main__":
    sys.exit(main())
