#!/usr/bin/env python3
"""Train a Wide ResNet on CIFAR-10 with batch normalization or batch
renormalization, and keep a per-epoch history that can be plotted and resumed.

  python train.py --norm renorm                      # the 2017 reference run
  python train.py --norm batchnorm --protocol wrn    # the WRN paper's recipe
  python train.py --norm renorm --train-size 5000 --epochs 2   # a quick look
  python train.py --norm renorm --resume             # after an interruption
  python train.py --norm renorm --batch-size 8 --classes-per-batch 4 \\
      --renorm-schedule 0.04,0.19,0.31 --epochs 10   # pairs of images of a
                              # class; the schedule scaled to the run's steps

--lr is used as given for every --batch-size (no automatic scaling);
sweep.py trains all batch sizes with the same Adam learning rate.

Files of a run NAME (default NORM-PROTOCOL-bBATCH-sSEED, or
NORM-PROTOCOL-bBATCH-kK-sSEED with --classes-per-batch K):
  HISTORY_DIR/NAME.csv                one row per epoch, written as it ends:
                                      epoch, seconds (training steps only,
                                      measured after the device finished),
                                      eval_seconds, loss, accuracy, val_loss,
                                      val_accuracy, lr (and r_max, d_max of
                                      the first renorm layer after the epoch)
  HISTORY_DIR/NAME.json               the configuration (keys named as the
                                      flags; classes_per_batch null for
                                      i.i.d. batches; the renorm steps as
                                      used, also with --renorm-schedule),
                                      --input and --steps-per-execution as
                                      resolved, steps_per_epoch, backend,
                                      device, versions
  WEIGHTS_DIR/NAME.weights.h5         the last weights
  WEIGHTS_DIR/NAME.best.weights.h5    the weights of the best val_accuracy
  WEIGHTS_DIR/NAME.state.npz          weights, optimizer state and epoch: what
                                      --resume continues from
At the end of each epoch the state and weights files are replaced atomically
and the CSV row is appended and flushed, so Ctrl-C or a kill loses at most the
epoch in progress; --resume continues after the last finished epoch. A Keras
progress bar shows on a terminal. `loss` includes the L2 penalty of
--weight-decay. Validation uses --val-size test images (stratified, the same
for every run); the final test accuracy is on the whole test set.
"""

import argparse
import csv
import dataclasses
import datetime
import json
import os
import platform
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import cifar10

PROG = "train.py"
NORMS = ("batchnorm", "renorm", "keras-renorm")
INPUTS = ("auto", "host", "device")
# --steps-per-execution auto on an accelerator: at most this many steps per
# call from Keras's Python loop into the backend.
AUTO_STEPS_PER_EXECUTION = 64


# ------------------------------------------------------------------ protocols
@dataclass(frozen=True)
class Protocol:
    """Every hyperparameter of a training protocol; each has its flag
    (`--batch-size` for `batch_size`, ...), which overrides it."""

    epochs: int
    batch_size: int
    classes_per_batch: object  # None: i.i.d. batches; K: K classes per batch
    optimizer: str  # "adam" or "sgd"
    lr: float  # not scaled with batch_size: the same for every batch size
    lr_milestones: tuple  # epochs after which the lr is multiplied by lr_gamma
    lr_gamma: float
    sgd_momentum: float  # SGD only
    nesterov: bool  # SGD only
    weight_decay: float  # lambda: each gradient gains lambda * w (L2 loss)
    augment: bool  # 4-pixel pad, random 32x32 crop, horizontal flip
    depth: int  # WRN-depth-width
    width: int
    dropout: float
    norm_momentum: float  # of the moving statistics, Keras's convention
    norm_epsilon: float
    r_max: float  # renorm: final bounds and schedule (in steps) ...
    d_max: float  # ... keras-renorm: fixed clipping at r_max, d_max
    warmup_steps: int
    r_max_steps: int
    d_max_steps: int
    renorm_schedule: object  # None, or (W, D, R): the warmup_steps,
    # d_max_steps, r_max_steps as fractions of the run's steps (all epochs)


PROTOCOLS = {
    # The 2017 reference run (titu1994/BatchRenormalization, Keras 1): WRN-16-4,
    # Adam with Keras's defaults, batch 128, 100 epochs, no augmentation, no
    # dropout, no weight decay, Keras's BN momentum and epsilon; BRN's
    # schedule as in the paper (the run has 391 * 100 = 39,100 steps).
    "seed": Protocol(
        epochs=100,
        batch_size=128,
        classes_per_batch=None,
        optimizer="adam",
        lr=1e-3,
        lr_milestones=(),
        lr_gamma=1.0,
        sgd_momentum=0.0,
        nesterov=False,
        weight_decay=0.0,
        augment=False,
        depth=16,
        width=4,
        dropout=0.0,
        norm_momentum=0.99,
        norm_epsilon=1e-3,
        r_max=3.0,
        d_max=5.0,
        warmup_steps=5000,
        r_max_steps=40000,
        d_max_steps=25000,
        renorm_schedule=None,
    ),
    # The Wide ResNet paper's CIFAR recipe (Zagoruyko & Komodakis 2016):
    # SGD, momentum 0.9, Nesterov, lr 0.1 times 0.2 after epochs 60, 120,
    # 160, weight decay 5e-4, batch 128, 200 epochs, pad-crop-flip
    # augmentation; Torch's BN momentum (0.1, i.e. 0.9 here) and epsilon.
    "wrn": Protocol(
        epochs=200,
        batch_size=128,
        classes_per_batch=None,
        optimizer="sgd",
        lr=0.1,
        lr_milestones=(60, 120, 160),
        lr_gamma=0.2,
        sgd_momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        augment=True,
        depth=16,
        width=4,
        dropout=0.0,
        norm_momentum=0.9,
        norm_epsilon=1e-5,
        r_max=3.0,
        d_max=5.0,
        warmup_steps=5000,
        r_max_steps=40000,
        d_max_steps=25000,
        renorm_schedule=None,
    ),
}
PROTOCOL_KEYS = tuple(f.name for f in dataclasses.fields(Protocol))
# Settings of a run besides its protocol's (defaults in parse_args).
RUN_KEYS = (
    "norm",
    "protocol",
    "name",
    "seed",
    "train_size",
    "val_size",
    "mixed_precision",
    "jit_compile",
    "eval_batch_size",
    "input",
    "steps_per_execution",
)
CONFIG_KEYS = RUN_KEYS + PROTOCOL_KEYS
# Keys that histories written before they existed lack, with the value that
# those runs had (--resume fills them in).
LEGACY_DEFAULTS = {"classes_per_batch": None, "renorm_schedule": None,
                   "input": "host", "steps_per_execution": 1}
SCHEDULE_STEPS = ("warmup_steps", "d_max_steps", "r_max_steps")
# What --resume may change in a run's saved configuration (the speed
# settings: they do not change the math).
RESUMABLE_CHANGES = ("epochs", "jit_compile", "eval_batch_size", "input",
                     "steps_per_execution")


def lr_at(config, epoch):
    """The learning rate of 0-based `epoch`: a step schedule."""
    drops = sum(epoch >= milestone for milestone in config["lr_milestones"])
    return config["lr"] * config["lr_gamma"] ** drops


# ------------------------------------------------------------ errors, signals
class UsageError(Exception):
    """Bad flags: one line on stderr, exit 2."""


class Interrupted(BaseException):
    """A SIGINT or SIGTERM arrived."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def fail(message, code):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


@contextmanager
def interrupts_as_exceptions():
    """SIGINT and SIGTERM raise `Interrupted` (restored on exit)."""

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in _signals()}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextmanager
def interrupts_deferred():
    """SIGINT and SIGTERM wait until the block (an epoch's commit) is done."""
    pending = []
    previous = {s: signal.signal(s, lambda n, f: pending.append(n))
                for s in _signals()}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    if pending:
        raise Interrupted(pending[0])


def _signals():
    import threading

    if threading.current_thread() is not threading.main_thread():
        return ()
    return (signal.SIGINT, signal.SIGTERM)


# ----------------------------------------------------------------------- CLI
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        raise UsageError(f"{message} (see {PROG} --help)")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer: {text}")
    return value


def nonnegative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0: {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text}")
    return value


def nonnegative_float(text):
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0: {text}")
    return value


def steps_or_auto(text):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer or auto: {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1): {text}")
    return value


def at_least_one(text):
    value = float(text)
    if not 1 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 1: {text}")
    return value


def milestones(text):
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = None
    if values is None or any(v < 1 for v in values) or list(values) != sorted(
        set(values)
    ):
        raise argparse.ArgumentTypeError(
            f"must be increasing positive epochs separated by commas, like "
            f"60,120,160 (or an empty string for none): {text!r}"
        )
    return values


def schedule_fractions(text):
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if (len(values) != 3
            or not all(0 <= v < float("inf") for v in values)
            or any(0 < v < values[0] for v in values[1:])):
        raise argparse.ArgumentTypeError(
            "must be three fractions W,D,R of the run's steps (end of the "
            "warm-up, d_max reached, r_max reached), each >= 0, with D and R "
            f"0 or >= W, like 0.04,0.19,0.31: {text!r}")
    return values


def wrn_depth(text):
    value = int(text)
    if value < 10 or (value - 4) % 6:
        raise argparse.ArgumentTypeError(
            f"must be 6N + 4 with N >= 1 (10, 16, 22, 28, 40, ...): {text}"
        )
    return value


def run_name(text):
    if not text or text.startswith(".") or any(
        not (c.isalnum() or c in "._-+=") for c in text
    ):
        raise argparse.ArgumentTypeError(
            f"must be a file name of letters, digits and ._-+=: {text!r}"
        )
    return text


def protocols_table():
    rows = [("flag", *PROTOCOLS)]
    for key in PROTOCOL_KEYS:
        values = []
        for protocol in PROTOCOLS.values():
            value = getattr(protocol, key)
            if isinstance(value, tuple):
                value = ",".join(map(str, value)) or "none"
            elif value is None:
                value = "none"
            elif isinstance(value, bool):
                value = "on" if value else "off"
            values.append(str(value))
        rows.append(("--" + key.replace("_", "-"), *values))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
        for row in rows
    )


def build_parser():
    description, files = __doc__.split("\n\nFiles of a run", 1)
    parser = Parser(
        prog=PROG,
        description=description,
        epilog="protocols (--protocol; every value can be overridden by its "
        f"flag):\n{protocols_table()}\n\nFiles of a run{files}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # to tell explicit flags apart
    )
    run = parser.add_argument_group("run")
    run.add_argument("--norm", required=True, choices=NORMS,
                     help="normalization layer: keras.layers."
                     "BatchNormalization, BatchRenormalization (ours), or "
                     "BatchNormalization(renorm=True) (Keras's own)")
    run.add_argument("--protocol", choices=tuple(PROTOCOLS),
                     help="hyperparameters (table below; default: seed)")
    run.add_argument("--name", type=run_name,
                     help="run name, for its files (default: "
                     "NORM-PROTOCOL-bBATCH_SIZE-sSEED, with -kK before -sSEED "
                     "for --classes-per-batch K)")
    run.add_argument("--seed", type=nonnegative_int, metavar="SEED",
                     help="seed of initialization, shuffling, augmentation, "
                     "dropout and the --train-size subset; the same seed "
                     "repeats a CPU run (default: 0)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run from its last finished epoch, "
                     "with its saved configuration (only --epochs and the "
                     "speed flags may change); starts it if nothing is "
                     "saved")
    run.add_argument("--overwrite", action="store_true",
                     help="start the run again, replacing its files")

    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", type=Path, metavar="DIR",
                      help="CIFAR-10 in the official python layout "
                      "(cifar-10-batches-py); default: $CIFAR10_DIR, "
                      "else Keras's downloader")
    data.add_argument("--train-size", type=positive_int, metavar="N",
                      help="train on a stratified subset of N images "
                      "(default: all 50000)")
    data.add_argument("--val-size", type=positive_int, metavar="N",
                      help="validate each epoch on a stratified subset of N "
                      "test images, the same for every run (default: all "
                      "10000)")
    data.add_argument("--classes-per-batch", type=positive_int, metavar="K",
                      help="non-i.i.d. training batches: each from exactly K "
                      "classes, BATCH_SIZE / K images of each (the paper's "
                      "pairs: K = BATCH_SIZE / 2); K must divide "
                      "--batch-size; every training image is used once per "
                      "epoch; validation is unchanged (default: i.i.d. "
                      "batches, a random permutation each epoch)")
    data.add_argument("--augment", action=argparse.BooleanOptionalAction,
                      help="4-pixel zero padding, random 32x32 crop and "
                      "horizontal flip")

    model = parser.add_argument_group("model")
    model.add_argument("--depth", type=wrn_depth, metavar="D",
                       help="WRN depth, 6N + 4 (WRN-D-K)")
    model.add_argument("--width", type=positive_int, metavar="K",
                       help="WRN widening factor")
    model.add_argument("--dropout", type=fraction, metavar="RATE",
                       help="dropout rate inside each block")
    model.add_argument("--weight-decay", type=nonnegative_float,
                       metavar="LAMBDA",
                       help="lambda of L2 weight decay (each gradient gains "
                       "lambda * w), on all trainable weights")

    optimization = parser.add_argument_group("optimization")
    optimization.add_argument("--epochs", type=positive_int, metavar="N",
                              help="epochs in all (with --resume: may grow)")
    optimization.add_argument("--batch-size", type=positive_int, metavar="N",
                              help="training batch size (--lr is not scaled "
                              "with it)")
    optimization.add_argument("--optimizer", choices=("adam", "sgd"))
    optimization.add_argument("--lr", type=positive_float,
                              help="initial learning rate, used as given for "
                              "every --batch-size (no automatic scaling)")
    optimization.add_argument("--lr-milestones", type=milestones,
                              metavar="E1,E2,...",
                              help="epochs after which the learning rate is "
                              "multiplied by --lr-gamma")
    optimization.add_argument("--lr-gamma", type=positive_float,
                              metavar="GAMMA")
    optimization.add_argument("--sgd-momentum", type=fraction, metavar="M")
    optimization.add_argument("--nesterov",
                              action=argparse.BooleanOptionalAction)

    norm = parser.add_argument_group("normalization")
    norm.add_argument("--norm-momentum", type=fraction, metavar="M",
                      help="momentum of the moving statistics (fraction kept "
                      "per step)")
    norm.add_argument("--norm-epsilon", type=positive_float, metavar="EPS",
                      help="added to the batch variance")
    norm.add_argument("--r-max", type=at_least_one, metavar="R",
                      help="final bound of r (renorm, keras-renorm)")
    norm.add_argument("--d-max", type=nonnegative_float, metavar="D",
                      help="final bound of d (renorm, keras-renorm)")
    norm.add_argument("--warmup-steps", type=nonnegative_int, metavar="STEPS",
                      help="renorm: steps of plain BN (r_max=1, d_max=0)")
    norm.add_argument("--r-max-steps", type=nonnegative_int, metavar="STEPS",
                      help="renorm: step at which r_max is reached")
    norm.add_argument("--d-max-steps", type=nonnegative_int, metavar="STEPS",
                      help="renorm: step at which d_max is reached")
    norm.add_argument("--renorm-schedule", type=schedule_fractions,
                      metavar="W,D,R",
                      help="renorm: --warmup-steps, --d-max-steps and "
                      "--r-max-steps as fractions of the run's training steps "
                      "(EPOCHS x steps per epoch), rounded to whole steps, "
                      "e.g. 0.04,0.19,0.31 (the paper's 5k, 25k, 40k of "
                      "130k steps); excludes those three flags; the history "
                      "JSON records the steps used (with --resume they stay "
                      "as first resolved, even if --epochs grows)")

    speed = parser.add_argument_group("speed")
    speed.add_argument("--mixed-precision",
                       action=argparse.BooleanOptionalAction,
                       help="mixed_float16 policy (default: off)")
    speed.add_argument("--jit-compile", choices=("auto", "on", "off"),
                       help="XLA/JIT compilation; auto: for TensorFlow on a "
                       "CPU, on where the CPU lacks AVX-512 (measured faster "
                       "there, slower with it), else Keras's choice "
                       "(default: auto)")
    speed.add_argument("--eval-batch-size", type=positive_int, metavar="N",
                       help="batch size of evaluation (default: 500)")
    speed.add_argument("--input", choices=INPUTS,
                       help="where the training batches are made. host: "
                       "with NumPy, each copied to the device; device: the "
                       "training images are kept on the device (3 kB of "
                       "its memory per image, 4.8 kB with --augment), which "
                       "gathers, augments and normalizes each batch (the "
                       "same batches: their randomness is drawn on the host "
                       "from the same seeds); auto: device on a GPU or TPU "
                       "with jax or torch, else host (default: auto)")
    speed.add_argument("--steps-per-execution", type=steps_or_auto,
                       metavar="N",
                       help="training steps per call from Keras's Python "
                       "loop into the backend (compile(steps_per_execution)):"
                       " the same steps, fewer round trips; the progress bar "
                       "moves N steps at a time; N > 1 needs the tensorflow "
                       "or jax backend. auto: 1 on a CPU and with torch, "
                       f"else min({AUTO_STEPS_PER_EXECUTION}, steps per "
                       "epoch) (default: auto)")

    output = parser.add_argument_group("output")
    output.add_argument("--history-dir", type=Path, metavar="DIR",
                        help="where the CSV and JSON go (default: history)")
    output.add_argument("--weights-dir", type=Path, metavar="DIR",
                        help="where the weights go (default: weights)")
    return parser


def parse_args(argv):
    """The run's configuration (a dict of CONFIG_KEYS), the options, and the
    flags given explicitly."""
    explicit = vars(build_parser().parse_args(argv))
    protocol = PROTOCOLS[explicit.get("protocol", "seed")]
    config = dataclasses.asdict(protocol)
    config.update(
        norm=explicit["norm"],
        protocol=explicit.get("protocol", "seed"),
        seed=0,
        train_size=None,
        val_size=None,
        mixed_precision=False,
        jit_compile="auto",
        eval_batch_size=500,
        input="auto",
        steps_per_execution="auto",
    )
    config.update({k: v for k, v in explicit.items() if k in CONFIG_KEYS})
    config["lr_milestones"] = list(config["lr_milestones"])
    if config["renorm_schedule"] is not None:
        config["renorm_schedule"] = list(config["renorm_schedule"])
    classes = config["classes_per_batch"]
    config["name"] = explicit.get("name") or (
        f"{config['norm']}-{config['protocol']}-b{config['batch_size']}"
        + (f"-k{classes}" if classes else "") + f"-s{config['seed']}"
    )
    if classes and config["batch_size"] % classes:
        raise UsageError(
            f"--classes-per-batch {classes} must divide --batch-size "
            f"{config['batch_size']} (each class gives BATCH_SIZE / K images "
            "to a batch)")
    steps_flags = [key for key in SCHEDULE_STEPS if key in explicit]
    if "renorm_schedule" in explicit and steps_flags:
        raise UsageError(
            "--renorm-schedule excludes "
            + ", ".join("--" + key.replace("_", "-") for key in steps_flags)
            + " (it sets them from fractions of the run's steps)")
    if config["renorm_schedule"] is None:
        check_schedule(config)
    options = argparse.Namespace(
        resume=explicit.get("resume", False),
        overwrite=explicit.get("overwrite", False),
        data_dir=explicit.get("data_dir"),
        history_dir=explicit.get("history_dir", Path("history")),
        weights_dir=explicit.get("weights_dir", Path("weights")),
    )
    if options.resume and options.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    return config, options, explicit


def resolve_schedule(config, steps_per_epoch):
    """With --renorm-schedule W,D,R: sets warmup_steps, d_max_steps and
    r_max_steps to those fractions of the run's epochs * steps_per_epoch
    training steps, rounded to the nearest step."""
    if config["renorm_schedule"] is None:
        return
    total = config["epochs"] * steps_per_epoch
    for key, share in zip(SCHEDULE_STEPS, config["renorm_schedule"]):
        config[key] = int(share * total + 0.5)


def check_schedule(config):
    for key in ("r_max_steps", "d_max_steps"):
        if 0 < config[key] < config["warmup_steps"]:
            raise UsageError(
                f"--{key.replace('_', '-')} {config[key]} must be 0 or >= "
                f"--warmup-steps {config['warmup_steps']}"
            )


# --------------------------------------------------------------------- files
@dataclass
class Paths:
    csv: Path
    json: Path
    last: Path
    best: Path
    state: Path

    @classmethod
    def of(cls, name, history_dir, weights_dir):
        return cls(
            csv=history_dir / f"{name}.csv",
            json=history_dir / f"{name}.json",
            last=weights_dir / f"{name}.weights.h5",
            best=weights_dir / f"{name}.best.weights.h5",
            state=weights_dir / f"{name}.state.npz",
        )

    def all(self):
        return (self.csv, self.json, self.last, self.best, self.state)


def writable_dir(path, what):
    """Creates `path` if needed and checks that a file can be written there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".{PROG}.{os.getpid()}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(
            f"cannot write to the {what} {str(path)!r}: "
            f"{error.strerror or error}"
        ) from None


@contextmanager
def atomic_path(path):
    """A temporary path beside `path` (same suffixes) that replaces `path`
    when the block ends without error, after being flushed to disk."""
    suffixes = "".join(path.suffixes)  # Keras wants .weights.h5
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffixes}")
    try:
        yield temporary
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json(path, data):
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n")


def columns(config):
    names = ["epoch", "seconds", "eval_seconds", "loss", "accuracy",
             "val_loss", "val_accuracy", "lr"]
    return names + (["r_max", "d_max"] if config["norm"] == "renorm" else [])


def write_rows(path, header, rows):
    """Replaces the CSV with `rows`, atomically."""
    with atomic_path(path) as temporary:
        with open(temporary, "w", newline="") as file:
            writer = csv.DictWriter(file, header, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


def append_row(path, header, row):
    with open(path, "a", newline="") as file:
        csv.DictWriter(file, header, extrasaction="ignore").writerow(row)
        file.flush()
        os.fsync(file.fileno())


def read_rows(path):
    try:
        with open(path, newline="") as file:
            return [row for row in csv.DictReader(file) if row.get("epoch")]
    except FileNotFoundError:
        return []


def save_state(model, path, meta):
    """Model variables, optimizer variables and `meta`, in one .npz."""
    arrays = {"meta": np.array(json.dumps(meta))}
    for prefix, variables in (("model", model.variables),
                              ("optimizer", model.optimizer.variables)):
        for i, variable in enumerate(variables):
            arrays[f"{prefix}/{i:04d}"] = np.asarray(variable.numpy())
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as file:
            np.savez(file, **arrays)


def load_state(model, path):
    """Restores what `save_state` saved; returns its `meta`."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {key: saved[key] for key in saved.files}
        meta = json.loads(str(arrays.pop("meta")))
    except Exception as error:
        raise RuntimeError(f"cannot read {path} ({error})") from None
    if not model.optimizer.built:  # build() twice adds variables
        model.optimizer.build(model.trainable_variables)
    for prefix, variables in (("model", model.variables),
                              ("optimizer", model.optimizer.variables)):
        keys = sorted(k for k in arrays if k.startswith(prefix + "/"))
        shapes = [tuple(arrays[k].shape) for k in keys]
        if shapes != [tuple(v.shape) for v in variables]:
            raise RuntimeError(
                f"{path} does not fit this model and optimizer ({prefix} "
                f"variables differ); was the run's configuration changed?"
            )
        for key, variable in zip(keys, variables):
            variable.assign(arrays[key])
    return meta


def save_weights(model, path):
    with atomic_path(path) as temporary:
        model.save_weights(temporary)


# ------------------------------------------------------------------ training
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        config, options, explicit = parse_args(argv)
        with interrupts_as_exceptions():
            return train(config, options, explicit, argv)
    except (KeyboardInterrupt, Interrupted) as interruption:
        signum = getattr(interruption, "signum", signal.SIGINT)
        print(f"{newline()}{PROG}: interrupted ({signal.Signals(signum).name})"
              " before training began; nothing new was saved", file=sys.stderr)
        return 128 + signum
    except UsageError as error:
        return fail(error, 2)
    except (cifar10.DataError, OSError, RuntimeError) as error:
        return fail(error, 1)


def train(config, options, explicit, argv):
    # 1. The run's files: start it, or resume it with its saved configuration.
    writable_dir(options.history_dir, "history folder")
    writable_dir(options.weights_dir, "weights folder")
    paths = Paths.of(config["name"], options.history_dir, options.weights_dir)
    resuming = options.resume and paths.state.is_file()
    saved_config = {}
    if options.resume and paths.json.is_file():
        saved_config = read_json(paths.json)
        config = resumed_config(config, saved_config, explicit)
    elif resuming:
        raise RuntimeError(f"cannot resume: {paths.json}, the run's "
                           "configuration, is missing")
    elif not options.overwrite and any(p.exists() for p in paths.all()):
        raise UsageError(
            f"run {config['name']!r} exists ({paths.csv}, {paths.state}); "
            "pass --resume to continue it, --overwrite to start it again, or "
            "another --name")

    # 2. Data: uint8 images in memory, normalized batch by batch.
    data = cifar10.load(options.data_dir)
    for key, images in (("train_size", data.x_train),
                        ("val_size", data.x_test)):
        config[key] = config[key] or len(images)
        if config[key] > len(images):
            raise UsageError(
                f"--{key.replace('_', '-')} {config[key]} is more than the "
                f"{len(images)} images in {data.source}")
    mean, std = cifar10.channel_stats(data.x_train)
    chosen = np.arange(len(data.x_train))
    if config["train_size"] < len(data.x_train):
        chosen = cifar10.stratified_subset(data.y_train, config["train_size"],
                                           seed=config["seed"])
    x_train, y_train = data.x_train[chosen], data.y_train[chosen]
    chosen = np.arange(len(data.x_test))
    if config["val_size"] < len(data.x_test):  # the same for every run
        chosen = cifar10.stratified_subset(data.y_test, config["val_size"], 0)
    x_val = cifar10.normalize(data.x_test[chosen], mean, std)
    y_val = data.y_test[chosen]
    classes = config["classes_per_batch"]
    present = len(np.unique(y_train))
    if classes and classes > present:
        raise UsageError(
            f"--classes-per-batch {classes} is more than the {present} "
            f"classes among the {len(y_train)} training images")
    steps = cifar10.steps_per_epoch(y_train, config["batch_size"], classes)
    if not resuming:  # a resumed run keeps the steps it started with
        resolve_schedule(config, steps)

    # 3. Model and optimizer (Keras is imported only now: bad input fails fast).
    import keras

    with keras_settings(keras, config):
        model = build_model(keras, config)
        environment = describe_environment(keras)
        config["input"] = resolve_input(config["input"], environment)
        config["steps_per_execution"] = resolve_steps_per_execution(
            config["steps_per_execution"], environment, steps)
        model.compile(
            optimizer=make_optimizer(keras, config),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile=jit_compile(config["jit_compile"], environment),
            steps_per_execution=config["steps_per_execution"])
        build_training_state(model, x_val[:1], y_val[:1])
        renorm = next((layer for layer in model.layers
                       if type(layer).__name__ == "BatchRenormalization"), None)
        resident = None  # with --input device: the training set on the device
        if config["input"] == "device":
            import device_data

            resident = device_data.DeviceTrainSet(
                x_train, y_train, mean, std, augmented=config["augment"])
        header = columns(config)
        session = dict(started=now(), command=command_line(argv),
                       jit_compile=bool(model.jit_compile), **environment)

        # 4. Restore the last finished epoch, or start from scratch.
        if resuming:
            meta = load_state(model, paths.state)
            start, best = meta["epoch"], meta["best"]
            rows = [r for r in read_rows(paths.csv)
                    if int(r["epoch"]) <= start]
            if not rows or int(rows[-1]["epoch"]) != start:
                rows.append(meta["row"])  # killed between state and row
            write_rows(paths.csv, header, rows)
            if best["epoch"] == start:
                save_weights(model, paths.best)
            save_weights(model, paths.last)
            record = dict(saved_config, **config)
            record["sessions"] = saved_config.get("sessions", []) + [
                dict(session, first_epoch=start + 1)]
            print(f"resuming run {config['name']} after epoch {start} of "
                  f"{config['epochs']}")
        else:
            start, best = 0, {"val_accuracy": -1.0, "epoch": 0}
            for path in paths.all():
                path.unlink(missing_ok=True)
            write_rows(paths.csv, header, [])
            record = dict(config, **environment, data=data.source,
                          normalization={"mean": mean.tolist(),
                                         "std": std.tolist()},
                          params=model.count_params(), steps_per_epoch=steps,
                          sessions=[dict(session, first_epoch=1)])
        write_json(paths.json, record)
        print(describe_run(config, model, environment, data.source, steps))

        # 5. Each epoch: training steps, validation, then a commit to disk.
        progress = 1 if sys.stdout.isatty() else 0  # Keras's progress bar
        clock = epoch_clock(keras)
        table = Table(header)
        epoch = start
        try:
            for epoch in range(start, config["epochs"]):
                lr = lr_at(config, epoch)
                model.optimizer.learning_rate = lr
                rng = cifar10.epoch_rng(config["seed"], epoch)
                if resident is None:
                    batches = cifar10.train_batches(
                        x_train, y_train, config["batch_size"], mean, std,
                        rng, augmented=config["augment"],
                        classes_per_batch=config["classes_per_batch"])
                else:  # the same batches, made on the device
                    batches = resident.train_batches(
                        config["batch_size"], rng,
                        classes_per_batch=config["classes_per_batch"])
                logs = model.fit(batches, steps_per_epoch=steps, epochs=1,
                                 shuffle=False, verbose=progress,
                                 callbacks=[clock]).history
                if progress:
                    print("\x1b[1A\x1b[2K", end="")  # the bar gives way
                evaluation_start = time.perf_counter()
                val_logs = model.evaluate(
                    x_val, y_val, batch_size=config["eval_batch_size"],
                    verbose=0, return_dict=True)
                row = {
                    "epoch": epoch + 1,
                    "seconds": f"{clock.seconds:.3f}",
                    "eval_seconds":
                        f"{time.perf_counter() - evaluation_start:.3f}",
                    "loss": f"{logs['loss'][-1]:.6g}",
                    "accuracy": f"{logs['accuracy'][-1]:.6g}",
                    "val_loss": f"{val_logs['loss']:.6g}",
                    "val_accuracy": f"{val_logs['accuracy']:.6g}",
                    "lr": f"{lr:.6g}",
                }
                if renorm is not None:
                    row["r_max"] = f"{renorm.current_r_max():.6g}"
                    row["d_max"] = f"{renorm.current_d_max():.6g}"
                improved = val_logs["accuracy"] > best["val_accuracy"]
                if improved:
                    best = {"val_accuracy": val_logs["accuracy"],
                            "epoch": epoch + 1}
                with interrupts_deferred():
                    save_state(model, paths.state,
                               {"epoch": epoch + 1, "best": best, "row": row})
                    append_row(paths.csv, header, row)
                    if improved:
                        save_weights(model, paths.best)
                    save_weights(model, paths.last)
                table.print_row(row)
        except (KeyboardInterrupt, Interrupted) as interruption:
            signum = getattr(interruption, "signum", signal.SIGINT)
            done = len(read_rows(paths.csv))
            print(f"{newline()}{PROG}: interrupted "
                  f"({signal.Signals(signum).name}) in epoch {epoch + 1} of "
                  f"{config['epochs']}; "
                  + (f"epochs 1-{done} are saved" if done
                     else "no epoch had finished")
                  + f"; continue with: {resume_command(argv)}",
                  file=sys.stderr)
            return 128 + signum

        # 6. The end: test accuracy of the last weights, and the files.
        if config["val_size"] == len(data.x_test):  # validation was the test
            test = {"accuracy": float(read_rows(paths.csv)[-1]["val_accuracy"])}
        else:
            test = model.evaluate(
                cifar10.normalize(data.x_test, mean, std), data.y_test,
                batch_size=config["eval_batch_size"], verbose=0,
                return_dict=True)
    record = read_json(paths.json)
    record["result"] = {"test_accuracy": test["accuracy"],
                        "test_images": len(data.x_test),
                        "best_val_accuracy": best["val_accuracy"],
                        "best_epoch": best["epoch"]}
    write_json(paths.json, record)
    print(f"test accuracy {test['accuracy']:.4f} (last weights, all "
          f"{len(data.x_test)} test images); best val_accuracy "
          f"{best['val_accuracy']:.4f} at epoch {best['epoch']}")
    print("files: " + ", ".join(str(p) for p in paths.all()))
    return 0


@contextmanager
def keras_settings(keras, config):
    """A fresh Keras session with the run's seed and dtype policy; the policy
    is restored afterwards (for callers in the same process, like tests)."""
    policy = keras.config.dtype_policy()
    keras.backend.clear_session()
    keras.utils.set_random_seed(config["seed"])
    if config["mixed_precision"]:
        keras.config.set_dtype_policy("mixed_float16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(policy)


def read_json(path):
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise RuntimeError(f"{path} is unreadable ({error})") from None


def resumed_config(config, saved, explicit):
    """The saved configuration, with the changes that --resume allows."""
    saved = {**LEGACY_DEFAULTS, **saved}
    missing = [key for key in CONFIG_KEYS if key not in saved]
    if missing:
        raise RuntimeError(
            f"cannot resume: the saved configuration lacks {', '.join(missing)}"
        )
    resumed = {key: saved[key] for key in CONFIG_KEYS}
    for key, value in explicit.items():
        if key not in CONFIG_KEYS or key in RESUMABLE_CHANGES:
            continue
        value = list(value) if isinstance(value, tuple) else value
        if value != resumed[key]:
            flag = "--" + key.replace("_", "-")
            raise UsageError(
                f"{flag} {value} differs from the saved configuration of run "
                f"{config['name']!r} ({resumed[key]}); leave it out to resume, "
                "or start a new run with another --name")
    for key in RESUMABLE_CHANGES:
        resumed[key] = config[key]
    return resumed


def build_model(keras, config):
    from models import wide_resnet

    norm_kwargs = dict(momentum=config["norm_momentum"],
                       epsilon=config["norm_epsilon"])
    if config["norm"] in ("renorm", "keras-renorm"):
        norm_kwargs.update(r_max=config["r_max"], d_max=config["d_max"])
    if config["norm"] == "renorm":
        norm_kwargs.update(warmup_steps=config["warmup_steps"],
                           r_max_steps=config["r_max_steps"],
                           d_max_steps=config["d_max_steps"])
    return wide_resnet(
        config["depth"],
        config["width"],
        norm=config["norm"],
        norm_kwargs=norm_kwargs,
        dropout=config["dropout"],
        weight_decay=config["weight_decay"],
    )


def build_training_state(model, x, y):
    """Creates the optimizer's and the metrics' variables before the first
    training step. Keras's TensorFlow trainer otherwise creates them while
    it traces that step, and then traces it a second time (tf.function
    retraces a function that created variables): about 2.5 s more per run
    with a small network on a CPU. The same variables, only created earlier;
    the other backends build them before the first step anyway."""
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    if hasattr(model, "_symbolic_build"):  # Keras 3's own pre-build
        model._symbolic_build(data_batch=(x, y, None))


def make_optimizer(keras, config):
    if config["optimizer"] == "adam":
        return keras.optimizers.Adam(learning_rate=config["lr"])
    return keras.optimizers.SGD(
        learning_rate=config["lr"],
        momentum=config["sgd_momentum"],
        nesterov=config["nesterov"],
    )


def jit_compile(choice, environment):
    """--jit-compile: `auto` is Keras's choice, except for TensorFlow on a
    CPU (where Keras turns XLA off): XLA there where the CPU lacks AVX-512,
    TensorFlow's own (oneDNN) kernels where it has it. Measured with
    `bench.py --level jit` (benchmarks/NOTES.md): XLA took 0.87 (BN) and
    0.93 (BRN) of the time per step on an AVX2-only EPYC, and 1.6 times it on
    an AVX-512 Zen 4."""
    if choice in ("on", "off"):
        return choice == "on"
    if (environment["backend"], environment["device_type"]) == (
            "tensorflow", "cpu"):
        return not cpu_has_avx512()
    return "auto"


def cpu_has_avx512(cpuinfo="/proc/cpuinfo"):
    """Whether the CPU reports AVX-512 (Linux's /proc/cpuinfo; True where
    that cannot be read, which keeps XLA off)."""
    try:
        with open(cpuinfo) as file:
            for line in file:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return True


def resolve_input(choice, environment):
    """--input: `auto` is `device` on an accelerator (GPU, TPU), where it
    spares the host loop the pixel work and the copies, and `host` on a CPU,
    where the device is the host and NumPy is as fast, and with TensorFlow,
    whose Keras trainer feeds a generator through tf.data.from_generator:
    that copies every device batch back to the host (measured slower on a
    CPU; benchmarks/NOTES.md)."""
    if choice != "auto":
        return choice
    if (environment["device_type"] == "cpu"
            or environment["backend"] == "tensorflow"):
        return "host"
    return "device"


def resolve_steps_per_execution(choice, environment, steps):
    """--steps-per-execution: `auto` is 1 on a CPU (a step takes long next
    to the Python loop) and with torch (whose Keras trainer runs one step per
    call), else enough steps per call to amortize the loop, at most an
    epoch's. Keras trains the same `steps` steps whatever the value: the
    last call of an epoch runs the steps left."""
    if choice == "auto":
        if environment["device_type"] == "cpu" or (
                environment["backend"] == "torch"):
            return 1
        return min(steps, AUTO_STEPS_PER_EXECUTION)
    if choice > 1 and environment["backend"] == "torch":
        raise UsageError(
            f"--steps-per-execution {choice} needs the tensorflow or jax "
            "backend (Keras's torch trainer runs one step per call); use 1 "
            "or auto")
    return choice


def epoch_clock(keras):
    """A Keras callback that times an epoch's training steps, stopping the
    clock once the device is done (defined here so Keras is imported late)."""

    class EpochClock(keras.callbacks.Callback):
        seconds = None

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            # Reading values that the last step wrote waits for the device.
            keras.ops.convert_to_numpy(self.model.optimizer.iterations)
            for value in (logs or {}).values():
                float(value)
            self.seconds = time.perf_counter() - self.start

    return EpochClock()


class Table:
    """The per-epoch table on stdout."""

    FORMATS = {"epoch": ("epoch", 5), "seconds": ("train_s", 8),
               "eval_seconds": ("eval_s", 7), "loss": ("loss", 7),
               "accuracy": ("acc", 6), "val_loss": ("val_loss", 8),
               "val_accuracy": ("val_acc", 7), "lr": ("lr", 8),
               "r_max": ("r_max", 5), "d_max": ("d_max", 5)}

    def __init__(self, header):
        self.header = header
        print("  ".join(self.FORMATS[c][0].rjust(self.FORMATS[c][1])
                        for c in header), flush=True)

    def print_row(self, row):
        cells = []
        for column in self.header:
            value = row[column]
            if column in ("seconds", "eval_seconds"):
                value = f"{float(value):.1f}"
            elif column == "lr":
                value = f"{float(value):.2e}"
            elif column in ("r_max", "d_max"):
                value = f"{float(value):.2f}"
            elif column != "epoch":
                value = f"{float(value):.4f}"
            cells.append(str(value).rjust(self.FORMATS[column][1]))
        print("  ".join(cells), flush=True)


def describe_run(config, model, environment, source, steps):
    optimizer = config["optimizer"] + (
        f" (momentum {config['sgd_momentum']}"
        f"{', nesterov' if config['nesterov'] else ''})"
        if config["optimizer"] == "sgd" else "")
    milestones = (f" x{config['lr_gamma']} after epochs "
                  f"{','.join(map(str, config['lr_milestones']))}"
                  if config["lr_milestones"] else "")
    classes = config["classes_per_batch"]
    sampling = (f" of {classes} classes ({config['batch_size'] // classes} "
                "images each)" if classes else " (i.i.d.)")
    schedule = ""
    if config["norm"] == "renorm":
        fractions = config["renorm_schedule"]
        schedule = (
            f"\n  renorm: r_max 1 -> {config['r_max']:g} and d_max 0 -> "
            f"{config['d_max']:g} from step {config['warmup_steps']}, reached "
            f"at steps {config['r_max_steps']} and {config['d_max_steps']}"
            + (f" (--renorm-schedule {','.join(map(str, fractions))})"
               if fractions else ""))
    return (
        f"run {config['name']}: WRN-{config['depth']}-{config['width']} "
        f"({model.count_params() / 1e6:.2f} M parameters) with "
        f"{config['norm']}, protocol {config['protocol']}\n"
        f"  {optimizer}, lr {config['lr']:g}{milestones}, batches of "
        f"{config['batch_size']}{sampling}, {config['epochs']} epochs of "
        f"{steps} steps, "
        f"weight decay {config['weight_decay']:g}, dropout "
        f"{config['dropout']:g}, augmentation "
        f"{'on' if config['augment'] else 'off'}, seed {config['seed']}\n"
        f"  data {source}: {config['train_size']} training images, "
        f"{config['val_size']} validation (test) images{schedule}\n"
        f"  Keras {environment['versions']['keras']}, backend "
        f"{environment['backend']}, {environment['device']}\n"
        f"  batches made on the {config['input']} (--input), "
        f"{config['steps_per_execution']} training step"
        f"{'s' if config['steps_per_execution'] > 1 else ''} per execution "
        "(--steps-per-execution)"
    )


def describe_environment(keras):
    """Backend, device and versions: the one framework-specific fast path."""
    backend = keras.backend.backend()
    versions = {"python": platform.python_version(), "keras": keras.__version__,
                "numpy": np.__version__}
    try:
        import batch_renorm

        versions["batch_renorm"] = batch_renorm.__version__
    except (ImportError, AttributeError):
        pass
    device_type, device = "cpu", None
    if backend == "tensorflow":
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            device_type = "gpu"
            device = details.get("device_name", gpus[0].name)
    elif backend == "jax":
        import jax
        import jaxlib

        versions["jax"] = jax.__version__
        versions["jaxlib"] = jaxlib.__version__
        first = jax.devices()[0]
        if first.platform != "cpu":
            device_type, device = first.platform, first.device_kind
    elif backend == "torch":
        import torch

        versions["torch"] = torch.__version__
        if torch.cuda.is_available():
            device_type, device = "gpu", torch.cuda.get_device_name(0)
    if device is None:
        cores = (len(os.sched_getaffinity(0))
                 if hasattr(os, "sched_getaffinity") else os.cpu_count())
        device = f"CPU: {cpu_name()}, {cores} cores"
    else:
        device = f"{device_type.upper()}: {device}"
    return {"backend": backend, "device": device, "device_type": device_type,
            "versions": versions}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def newline():
    """Ends a progress bar's line on a terminal."""
    return "\n" if sys.stdout.isatty() else ""


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")


def command_line(argv):
    return shlex.join(["python", PROG, *argv])


def resume_command(argv):
    argv = [a for a in argv if a != "--overwrite"]
    if "--resume" not in argv:
        argv.append("--resume")
    return command_line(argv)


if __name__ == "__main__":
    sys.exit(main())
