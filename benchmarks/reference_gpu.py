#!/usr/bin/env python3
"""The 2017 reproduction on a GPU, in one command: the `seed` protocol
(WRN-16-4, Adam, batch 128, 100 epochs, all 50,000 training images,
validated on the 10,000 test images as the 2017 code did) with batchnorm and
renorm on JAX, then plot.py and bench.py's model level.

  python benchmarks/reference_gpu.py                 # seed 0, both norms
  python benchmarks/reference_gpu.py --seeds 1       # a second window: seed 1
  python benchmarks/reference_gpu.py --tiny          # the same job in small,
                                                     # on any device (CI: CPU)

Checks first that Keras runs on JAX and that JAX sees a GPU (one line and
exit 1 if not, with how to get a CUDA build of JAX; it never installs or
replaces one). Each run uses train.py's accelerator path: the training set
resident on the device (--input device), 64 steps per compiled call
(--steps-per-execution auto), --precision as given (recorded in each run's
JSON). Files, named by the GPU (SLUG: its name in lower case, e.g.
nvidia-h200):
  HISTORY/gpu-SLUG/NORM-seed-sSEED.{csv,json}    (default HISTORY: history;
                                                the weights in WEIGHTS/gpu-SLUG)
  PLOTS/gpu-SLUG/ curves, seconds per epoch, timing.md (default: plots)
  RESULTS/gpu-SLUG/jax-gpu.{json,csv}, summary.md  (default:
                                                benchmarks/results)
Resumable: a finished run is kept, an interrupted one continues
(train.py --resume). The whole default job is sized for about 9 minutes of
an H100 (two 100-epoch runs at about 2 s an epoch, compilation, plots, the
benchmark).
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiment import runfiles  # noqa: E402 (after the path)
from experiment.cli import Parser  # noqa: E402
from experiment.cli import UsageError  # noqa: E402
from experiment.cli import fail  # noqa: E402
from experiment.cli import nonnegative_int  # noqa: E402
from experiment.cli import positive_int  # noqa: E402
from experiment.protocols import PRECISIONS  # noqa: E402
from experiment.protocols import PROTOCOLS  # noqa: E402

PROG = "reference_gpu.py"
NORMS = ("batchnorm", "renorm")
# --tiny: a few hundred images, one epoch, WRN-10-1: the same commands and
# files, in a minute on a CPU.
TINY_EPOCHS = 1
TINY_FLAGS = ["--depth", "10", "--width", "1", "--train-size", "300",
              "--val-size", "100", "--epochs", str(TINY_EPOCHS),
              "--eval-batch-size", "100"]
HOW_TO_GET_JAX = ("install a CUDA build of JAX first (pip install -U "
                  "'jax[cuda12]'), or run with --tiny on the CPU")


def build_parser():
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                    epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--norms", nargs="+", choices=NORMS,
                        default=list(NORMS), metavar="NORM",
                        help="default: batchnorm renorm")
    parser.add_argument("--seeds", nargs="+", type=nonnegative_int,
                        default=[0], metavar="SEED", help="default: 0")
    parser.add_argument("--precision", choices=PRECISIONS,
                        default="mixed_bfloat16",
                        help="dtype policy of every run (default: "
                        "mixed_bfloat16, the GPU target)")
    parser.add_argument("--epochs", type=positive_int,
                        help="default: the protocol's 100 (1 with --tiny)")
    parser.add_argument("--tiny", action="store_true",
                        help="WRN-10-1, 300 images, 1 epoch, on whatever "
                        "device JAX has (a test of the job itself)")
    parser.add_argument("--data-dir", type=Path, metavar="DIR",
                        help="CIFAR-10 (default: $CIFAR10_DIR)")
    parser.add_argument("--history-dir", type=Path, default=Path("history"),
                        metavar="DIR")
    parser.add_argument("--weights-dir", type=Path, default=Path("weights"),
                        metavar="DIR")
    parser.add_argument("--plots-dir", type=Path, default=Path("plots"),
                        metavar="DIR")
    parser.add_argument("--results-dir", type=Path, metavar="DIR",
                        default=ROOT / "benchmarks" / "results")
    parser.add_argument("--bench-repeats", type=positive_int, default=5,
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


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def train_argv(args, norm, seed, history, weights):
    argv = ["--norm", norm, "--protocol", "seed", "--seed", str(seed),
            "--name", f"{norm}-seed-s{seed}", "--val-from", "test",
            "--precision", args.precision, "--input", "device",
            "--history-dir", str(history), "--weights-dir", str(weights),
            "--resume"]
    if args.tiny:
        argv += TINY_FLAGS
    if args.epochs:
        argv += ["--epochs", str(args.epochs)]
    if args.data_dir:
        argv += ["--data-dir", str(args.data_dir)]
    return argv


def bench_argv(args, results):
    argv = ["--backend", "jax", "--level", "model", "--dtype-policy",
            args.precision, "--results-dir", str(results)]
    if args.tiny:
        return argv + ["--depth", "10", "--width", "1", "--steps", "1",
                       "--repeats", "2", "--batch-size", "16"]
    return argv + ["--repeats", str(args.bench_repeats)]


def run(script, argv):
    """`python SCRIPT ARGV` in this environment; its exit code."""
    command = [sys.executable, str(ROOT / script), *argv]
    print(f"{PROG}: {shlex.join(['python', script, *argv])}", flush=True)
    return subprocess.run(command, env=dict(os.environ, KERAS_BACKEND="jax"),
                          cwd=ROOT).returncode


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        for key in ("data_dir", "history_dir", "weights_dir", "plots_dir",
                    "results_dir"):  # the scripts run in ROOT
            if getattr(args, key) is not None:
                setattr(args, key, getattr(args, key).resolve())
        name = gpu_name(args.tiny)
    except UsageError as error:
        return fail(PROG, error, 2)
    except NoGPU as error:
        return fail(PROG, error, 1)
    where = f"gpu-{slug(name)}"
    epochs = args.epochs or (TINY_EPOCHS if args.tiny
                            else PROTOCOLS["seed"].epochs)
    history = args.history_dir / where
    print(f"{PROG}: device {name}; runs in {history}", flush=True)
    steps = [("train.py", train_argv(args, norm, seed, history,
                                     args.weights_dir / where))
             for seed in args.seeds for norm in args.norms]
    steps.append(("plot.py", ["--history-dir", str(history),
                              "--plots-dir", str(args.plots_dir / where)]))
    steps.append(("benchmarks/bench.py",
                  bench_argv(args, args.results_dir / where)))
    for script, script_argv in steps:
        if script == "train.py":
            name = script_argv[script_argv.index("--name") + 1]
            if runfiles.finished(history, name, epochs):
                print(f"{PROG}: {name}: finished, kept", flush=True)
                continue
        code = run(script, script_argv)
        if code:
            print(f"{PROG}: {script} exited {code}; rerun the same command "
                  "to continue (finished runs are kept)", file=sys.stderr)
            return code
    files = sorted(str(p) for folder in (history, args.plots_dir / where,
                                         args.results_dir / where)
                   for p in folder.iterdir() if p.is_file())
    print(f"{PROG}: done; files: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
