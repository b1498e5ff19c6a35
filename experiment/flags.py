"""train.py's command line: its flags, in groups, and the run's
configuration they give (a dict of CONFIG_KEYS: the protocol's values, then
the flags given)."""

import argparse
import dataclasses
from pathlib import Path

from experiment import hosts
from experiment import protocols
from experiment import runtime
from experiment.cli import Parser
from experiment.cli import UsageError
from experiment.cli import at_least_one
from experiment.cli import devices_or_all
from experiment.cli import fraction
from experiment.cli import milestones
from experiment.cli import nonnegative_float
from experiment.cli import nonnegative_int
from experiment.cli import positive_float
from experiment.cli import positive_int
from experiment.cli import run_name
from experiment.cli import schedule_fractions
from experiment.cli import steps_or_auto
from experiment.cli import wrn_depth
from experiment.protocols import CONFIG_KEYS
from experiment.protocols import NORMS
from experiment.protocols import PRECISIONS
from experiment.protocols import PROTOCOLS
from experiment.protocols import SAMPLINGS
from experiment.protocols import SCHEDULE_STEPS
from experiment.protocols import VAL_FROM
from experiment.runtime import AUTO_STEPS_PER_EXECUTION
from experiment.runtime import INPUTS

PROG = "train.py"
ON_OFF = argparse.BooleanOptionalAction

# Each group's flags: ("--flag METAVAR", kind, help), where kind is a tuple
# of choices, a type, an action, or add_argument's keywords. Defaults not
# given here are the protocol's (the table in --help). docs/experiment.md
# says more of each.
FLAGS = {
    "run": [
        ("--norm", dict(required=True, choices=NORMS),
         ("Keras's BatchNormalization, our BatchRenormalization, or Keras's "
          "BatchNormalization(renorm=True)")),
        ("--protocol", tuple(PROTOCOLS), "hyperparameters (default: seed)"),
        ("--name", run_name,
         ("run name, for its files (default: NORM-PROTOCOL-bBATCH_SIZE-sSEED, "
          "with before -sSEED -kK for --classes-per-batch K or -pairs for "
          "--sampling pairs, then -vV for --virtual-batch-size V)")),
        ("--seed SEED", nonnegative_int,
         "seed of all randomness; repeats a CPU run (default: 0)"),
        ("--resume", "store_true",
         ("continue the run after its last finished epoch, with its saved "
          "configuration (the speed flags may change, --epochs may grow); "
          "starts it if nothing is saved")),
        ("--overwrite", "store_true",
         "start the run again, replacing its files"),
    ],
    "data": [
        ("--data-dir DIR", Path,
         ("CIFAR-10's cifar-10-batches-py folder (default: $CIFAR10_DIR, "
          "else Keras's downloader)")),
        ("--train-size N", positive_int,
         ("train on a stratified subset of N images, drawn with --seed "
          "(default: all not held out, 45000)")),
        ("--val-from", VAL_FROM,
         ("validation images: held out of the training set (train), or a "
          "subset of the test set, as in 2017 (test) (default: train)")),
        ("--val-size N", positive_int,
         "validation images (default: 5000 from train, 10000 from test)"),
        ("--classes-per-batch K", positive_int,
         ("non-i.i.d. batches of K classes, BATCH_SIZE / K images each "
          "(K divides --batch-size; excludes --sampling)")),
        ("--sampling", SAMPLINGS,
         ("i.i.d. batches, or the paper's pairs of images of a class, V/2 "
          "distinct classes in a group of V (even --batch-size and V) "
          "(default: iid)")),
        ("--augment", ON_OFF,
         "4-pixel padding, random 32x32 crop and horizontal flip"),
    ],
    "model": [
        ("--depth D", wrn_depth, "WRN depth, 6N + 4 (WRN-D-K)"),
        ("--width K", positive_int, "WRN widening factor"),
        ("--dropout RATE", fraction, "dropout rate inside each block"),
        ("--weight-decay LAMBDA", nonnegative_float,
         ("L2 weight decay of all trainable weights (gradients gain "
          "lambda * w)")),
    ],
    "optimization": [
        ("--epochs N", positive_int, "epochs in all"),
        ("--batch-size N", positive_int, "training batch size"),
        ("--optimizer", ("adam", "sgd"), "the optimizer"),
        ("--lr", positive_float,
         "initial learning rate, not scaled with --batch-size"),
        ("--lr-milestones E1,E2,...", milestones,
         "epochs after which the learning rate is multiplied by --lr-gamma"),
        ("--lr-gamma GAMMA", positive_float, "learning rate decay factor"),
        ("--sgd-momentum M", fraction, "SGD's momentum"),
        ("--nesterov", ON_OFF, "SGD's Nesterov momentum"),
    ],
    "normalization": [
        ("--norm-momentum M", fraction,
         "momentum of the moving statistics"),
        ("--norm-epsilon EPS", positive_float, "added to the batch variance"),
        ("--r-max R", at_least_one, "final bound of r (renorm, keras-renorm)"),
        ("--d-max D", nonnegative_float,
         "final bound of d (renorm, keras-renorm)"),
        ("--warmup-steps STEPS", nonnegative_int,
         "renorm: steps of plain BN (r_max 1, d_max 0)"),
        ("--r-max-steps STEPS", nonnegative_int,
         "renorm: step at which r_max is reached"),
        ("--d-max-steps STEPS", nonnegative_int,
         "renorm: step at which d_max is reached"),
        ("--renorm-schedule W,D,R", schedule_fractions,
         ("renorm: the three step flags as fractions of the run's steps, "
          "e.g. 0.04,0.19,0.31 (the paper's)")),
    ],
    "virtual batches and measurements (--resume keeps them)": [
        ("--virtual-batch-size V", positive_int,
         ("normalize groups of V examples with their own statistics (ghost "
          "batch normalization; batchnorm: BatchRenormalization with r_max "
          "1, d_max 0 and no schedule; keras-renorm: refused) (default: "
          "the whole batch)")),
        ("--track-corrections", ON_OFF,
         ("write renorm's r and d per epoch and layer to "
          "NAME.corrections.csv (default: on for renorm)")),
        ("--train-mode-validation", ON_OFF,
         ("validate again with the norms in training mode: columns "
          "val_*_train_mode (default: on with one device)")),
    ],
    "speed": [
        ("--precision", PRECISIONS,
         "Keras's dtype policy (default: float32)"),
        ("--jit-compile", ("auto", "on", "off"),
         ("XLA/JIT compilation (default: auto: on for TensorFlow on a CPU "
          "without AVX-512, else Keras's choice)")),
        ("--devices N", devices_or_all,
         ("data parallel on N local devices, or all, with jax; synchronized "
          "statistics (default: 1)")),
        ("--eval-batch-size N", positive_int,
         "batch size of evaluation (default: 500)"),
        ("--input", INPUTS,
         ("where the training batches are made (default: auto: device on a "
          "GPU or TPU with jax or torch, else host)")),
        ("--steps-per-execution N", steps_or_auto,
         ("training steps per call into the backend (default: auto: 1 on a "
          "CPU and with torch; on an accelerator the epoch with jax and "
          f"--input device, else min({AUTO_STEPS_PER_EXECUTION}, steps per "
          "epoch))")),
    ],
    "output": [
        ("--history-dir DIR", Path,
         "where the CSV and JSON go (default: history)"),
        ("--weights-dir DIR", Path, "where the weights go (default: weights)"),
    ],
}


def build_parser(doc):
    """train.py's parser; `doc` (train.py's docstring) gives the description
    and, from its "Files of a run" on, the end of the epilog."""
    description, files = doc.split("\n\nFiles of a run", 1)
    parser = Parser(
        prog=PROG,
        description=description,
        epilog="protocols (--protocol; every value can be overridden by its "
        f"flag):\n{protocols.protocols_table()}\n\nFiles of a run{files}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # to tell explicit flags apart
    )
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
    if kind in ("store_true", ON_OFF):
        return {"action": kind}
    return {"type": kind, "metavar": metavar or None}


def parse_args(argv, doc):
    """The run's configuration (a dict of CONFIG_KEYS), the options, and the
    flags given explicitly."""
    explicit = vars(build_parser(doc).parse_args(argv))
    protocol = PROTOCOLS[explicit.get("protocol", "seed")]
    config = dataclasses.asdict(protocol)
    config.update(norm=explicit["norm"],
                  protocol=explicit.get("protocol", "seed"),
                  **protocols.RUN_DEFAULTS)
    config.update({k: v for k, v in explicit.items() if k in CONFIG_KEYS})
    config["lr_milestones"] = list(config["lr_milestones"])
    if config["renorm_schedule"] is not None:
        config["renorm_schedule"] = list(config["renorm_schedule"])
    processes = check_config(config, explicit)
    resolve_measurements(config, explicit)
    options = argparse.Namespace(
        resume=explicit.get("resume", False),
        overwrite=explicit.get("overwrite", False),
        data_dir=explicit.get("data_dir"),
        history_dir=explicit.get("history_dir", Path("history")),
        weights_dir=explicit.get("weights_dir", Path("weights")),
        processes=processes,
    )
    if options.resume and options.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    return config, options, explicit


def check_config(config, explicit):
    """Sets the run's sampling and name; refuses flags that contradict each
    other, the backend or the launcher's processes; returns the processes
    (`hosts.from_environment`)."""
    classes = config["classes_per_batch"]
    if classes and "sampling" in explicit:
        raise UsageError(
            f"--classes-per-batch {classes} is a sampling of its own "
            f"(recorded as sampling k{classes}); it excludes --sampling "
            f"{explicit['sampling']}")
    config["sampling"] = protocols.sampling_of(classes, config["sampling"])
    config["name"] = explicit.get("name") or protocols.default_name(config)
    if classes and config["batch_size"] % classes:
        raise UsageError(
            f"--classes-per-batch {classes} must divide --batch-size "
            f"{config['batch_size']} (each class gives BATCH_SIZE / K images "
            "to a batch)")
    check_pairs(config)
    protocols.check_virtual_batch_size(config)
    steps_flags = [key for key in SCHEDULE_STEPS if key in explicit]
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
                         f"{config['devices']} (leave --input at auto or "
                         "host)")
    return processes


def resolve_measurements(config, explicit):
    """--track-corrections and --train-mode-validation: their defaults, and
    what they need."""
    if config["track_corrections"] is None:
        config["track_corrections"] = config["norm"] == "renorm"
    if config["track_corrections"] and config["norm"] != "renorm":
        raise UsageError(f"--track-corrections needs --norm renorm (r and d "
                         f"are renorm's), not --norm {config['norm']}")
    one_device = config["devices"] == 1
    if config["train_mode_validation"] is None:
        config["train_mode_validation"] = one_device
    if config["train_mode_validation"] and not one_device:
        raise UsageError(f"--train-mode-validation needs one device, not "
                         f"--devices {config['devices']}")


def check_pairs(config):
    """--sampling pairs: a batch, and a group, of whole pairs."""
    if config["sampling"] != "pairs":
        return
    for key in ("batch_size", "virtual_batch_size"):
        if config[key] is not None and config[key] % 2:
            raise UsageError(
                f"--sampling pairs needs an even {protocols.flag(key)}, not "
                f"{config[key]} (every batch and normalization group is "
                "made of pairs)")
