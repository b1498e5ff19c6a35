"""train.py's command line: its flags, in groups, and the run's
configuration they give (a dict of CONFIG_KEYS: the protocol's values, then
the flags given)."""

import argparse
import dataclasses
from pathlib import Path

from experiment import cli
from experiment import hosts
from experiment import protocols
from experiment import runtime
from experiment.cli import UsageError
from experiment.protocols import CONFIG_KEYS
from models import NORMS

PROG = "train.py"
ON_OFF = {"action": argparse.BooleanOptionalAction}
STORE_TRUE = {"action": "store_true"}
# The flags outside the run's configuration, and their defaults.
OPTIONS = {"resume": False, "overwrite": False, "data_dir": None,
           "history_dir": Path("history"), "weights_dir": Path("weights")}

# Each group's flags: ("--flag METAVAR", kind, help), kind being choices, a
# type or add_argument's keywords; defaults not given are the protocol's (in
# the epilog). More: docs/experiment.md.
FLAGS = {
    "run": [
        ("--norm", dict(required=True, choices=NORMS),
         "BatchNormalization, BatchRenormalization (ours), or Keras's renorm"),
        ("--protocol", tuple(protocols.PROTOCOLS),
         "hyperparameters, table below (default: seed)"),
        ("--name", cli.run_name,
         "run name (default: NORM-PROTOCOL-bBATCH[-kK|-pairs][-vV]-sSEED)"),
        ("--seed SEED", cli.nonnegative_int, "random seed (default: 0)"),
        ("--resume", STORE_TRUE, "continue the run (or start it)"),
        ("--overwrite", STORE_TRUE, "start again, replacing the run's files"),
    ],
    "data": [
        ("--data-dir DIR", Path,
         "CIFAR-10's cifar-10-batches-py (default: $CIFAR10_DIR, or download)"),
        ("--train-size N", cli.positive_int,
         "train on a stratified subset (default: all, 45000)"),
        ("--val-from", protocols.VAL_FROM,
         "validation images: held out of training, or test (default: train)"),
        ("--val-size N", cli.positive_int,
         "validation images (default: 5000 from train, 10000 from test)"),
        ("--classes-per-batch K", cli.positive_int,
         "K classes a batch, BATCH_SIZE / K images each (not with --sampling)"),
        ("--sampling", protocols.SAMPLINGS,
         "iid, or the paper's pairs of images of a class (default: iid)"),
        ("--augment", ON_OFF, "pad by 4, random 32x32 crop, horizontal flip"),
    ],
    "model": [
        ("--depth D", cli.wrn_depth, "WRN depth, 6N + 4 (WRN-D-K)"),
        ("--width K", cli.positive_int, "WRN widening factor"),
        ("--dropout RATE", cli.fraction, "dropout rate inside each block"),
        ("--weight-decay LAMBDA", cli.nonnegative_float,
         "L2 weight decay (each gradient gains lambda * w)"),
    ],
    "optimization": [
        ("--epochs N", cli.positive_int, "epochs in all"),
        ("--batch-size N", cli.positive_int, "training batch size"),
        ("--optimizer", ("adam", "sgd"), "the optimizer"),
        ("--lr", cli.positive_float, "initial lr (not scaled with batch size)"),
        ("--lr-milestones E1,E2,...", cli.milestones,
         "epochs after which the learning rate is multiplied by --lr-gamma"),
        ("--lr-gamma GAMMA", cli.positive_float, "lr factor at each milestone"),
        ("--sgd-momentum M", cli.fraction, "SGD's momentum"),
        ("--nesterov", ON_OFF, "SGD's Nesterov momentum"),
    ],
    "normalization": [
        ("--norm-momentum M", cli.fraction, "momentum of the moving averages"),
        ("--norm-epsilon EPS", cli.positive_float, "added to the variance"),
        ("--r-max R", cli.at_least_one, "final r bound (renorm, keras-renorm)"),
        ("--d-max D", cli.nonnegative_float,
         "final d bound (renorm, keras-renorm)"),
        ("--warmup-steps STEPS", cli.nonnegative_int,
         "renorm: steps of plain BN (r_max 1, d_max 0)"),
        ("--r-max-steps STEPS", cli.nonnegative_int, "when r_max is reached"),
        ("--d-max-steps STEPS", cli.nonnegative_int, "when d_max is reached"),
        ("--renorm-schedule W,D,R", cli.schedule_fractions,
         "renorm: the 3 steps as fractions of the run's, e.g. 0.04,0.19,0.31"),
    ],
    "virtual batches and measurements (--resume keeps them)": [
        ("--virtual-batch-size V", cli.positive_int,
         "normalize groups of V examples: ghost BN (default: the whole batch)"),
        ("--track-corrections", ON_OFF,
         "renorm's r and d to NAME.corrections.csv (default: on for renorm)"),
        ("--train-mode-validation", ON_OFF,
         "validate in training mode too (default: on with one device)"),
    ],
    "speed": [
        ("--precision", protocols.PRECISIONS,
         "Keras's dtype policy (default: float32)"),
        ("--jit-compile", ("auto", "on", "off"), "XLA/JIT (default: auto)"),
        ("--devices N", cli.devices_or_all,
         "data parallel on N devices, or all, with jax (default: 1)"),
        ("--eval-batch-size N", cli.positive_int,
         "batch size of evaluation (default: 500)"),
        ("--input", runtime.INPUTS, "where batches are made (default: auto)"),
        ("--steps-per-execution N", cli.steps_or_auto,
         "training steps per call into the backend (default: auto)"),
    ],
    "output": [
        ("--history-dir DIR", Path, "CSV and JSON folder (default: history)"),
        ("--weights-dir DIR", Path, "weights folder (default: weights)"),
    ],
}


def build_parser(doc):
    """train.py's parser; `doc` (train.py's docstring) gives the description
    and, from its "Files of a run" on, the end of the epilog."""
    description, files = doc.split("\n\nFiles of a run", 1)
    parser = cli.Parser(
        prog=PROG, description=description,
        epilog="protocols (--protocol; every value can be overridden by its "
        f"flag):\n{protocols.protocols_table()}\n\nFiles of a run{files}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS)  # to tell explicit flags apart
    for title, flags in FLAGS.items():
        group = parser.add_argument_group(title)
        for flag, kind, text in flags:
            name, _, metavar = flag.partition(" ")
            group.add_argument(name, help=text, **keywords(kind, metavar))
    return parser


def keywords(kind, metavar):
    """add_argument's keywords for a FLAGS entry's kind."""
    if isinstance(kind, dict):
        return kind
    if isinstance(kind, tuple):
        return {"choices": kind}
    return {"type": kind, "metavar": metavar or None}


def parse_args(argv, doc):
    """The run's configuration, the options, and the flags given."""
    explicit = vars(build_parser(doc).parse_args(argv))
    protocol = explicit.get("protocol", "seed")
    config = dict(dataclasses.asdict(protocols.PROTOCOLS[protocol]),
                  norm=explicit["norm"], protocol=protocol,
                  **protocols.RUN_DEFAULTS)
    config.update((k, v) for k, v in explicit.items() if k in CONFIG_KEYS)
    config = {key: list(value) if isinstance(value, tuple) else value
              for key, value in config.items()}  # as JSON reads them back
    processes = check_config(config, explicit)
    resolve_measurements(config)
    options = argparse.Namespace(processes=processes, **{
        key: explicit.get(key, default) for key, default in OPTIONS.items()})
    if options.resume and options.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    return config, options, explicit


def check_config(config, explicit):
    """Sets the run's sampling and name; refuses flags that contradict each
    other, the backend or the launcher's processes, which it returns."""
    classes = config["classes_per_batch"]
    if classes and "sampling" in explicit:
        raise UsageError(
            f"--classes-per-batch {classes} is a sampling of its own "
            f"(recorded as sampling k{classes}); it excludes --sampling "
            f"{explicit['sampling']}")
    if classes:
        config["sampling"] = f"k{classes}"
    config["name"] = explicit.get("name") or protocols.default_name(config)
    if classes and config["batch_size"] % classes:
        raise UsageError(
            f"--classes-per-batch {classes} must divide --batch-size "
            f"{config['batch_size']} (each class gives BATCH_SIZE / K images "
            "to a batch)")
    for key in ("batch_size", "virtual_batch_size"):  # of whole pairs
        if config["sampling"] == "pairs" and (config[key] or 0) % 2:
            raise UsageError(
                f"--sampling pairs needs an even {protocols.flag(key)}, not "
                f"{config[key]} (every batch and normalization group is "
                "made of pairs)")
    protocols.check_virtual_batch_size(config)
    steps_flags = [key for key in protocols.SCHEDULE_STEPS if key in explicit]
    if "renorm_schedule" in explicit and steps_flags:
        raise UsageError(
            "--renorm-schedule excludes "
            + ", ".join(map(protocols.flag, steps_flags))
            + " (it sets them from fractions of the run's steps)")
    if config["renorm_schedule"] is None:
        protocols.check_schedule(config)
    if config["devices"] != 1 and runtime.configured_backend() != "jax":
        raise UsageError(
            f"--devices {config['devices']} needs the jax backend (Keras's "
            "distribution API for data parallel training); the backend is "
            f"{runtime.configured_backend()} (set KERAS_BACKEND=jax)")
    processes = hosts.from_environment()
    if processes.count > 1 and config["devices"] == 1:
        raise UsageError(
            f"{processes.count} processes ({hosts.COUNT}) train one run "
            "data parallel over all their devices: pass --devices all")
    if config["input"] == "device" and config["devices"] != 1:
        raise UsageError(f"--input device needs one device, not --devices "
                         f"{config['devices']} (leave --input at auto or host)")
    return processes


def resolve_measurements(config):
    """--track-corrections and --train-mode-validation: on by default where
    they can be, refused where they cannot."""
    for key, possible, need in (
            ("track_corrections", config["norm"] == "renorm",
             f"--norm renorm (r and d are renorm's), not {config['norm']}"),
            ("train_mode_validation", config["devices"] == 1,
             f"one device, not --devices {config['devices']}")):
        if config[key] is None:
            config[key] = possible
        if config[key] and not possible:
            raise UsageError(f"{protocols.flag(key)} needs {need}")
