"""train.py's command line: its flags, in groups, and the run's
configuration they give (a dict of CONFIG_KEYS, the protocol's values
overridden by the flags given)."""

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
    for add_flags in (add_run_flags, add_data_flags, add_model_flags,
                      add_optimization_flags, add_norm_flags,
                      add_measurement_flags, add_speed_flags,
                      add_output_flags):
        add_flags(parser)
    return parser


def add_run_flags(parser):
    run = parser.add_argument_group("run")
    run.add_argument("--norm", required=True, choices=NORMS,
                     help="normalization layer: keras.layers."
                     "BatchNormalization, BatchRenormalization (ours), or "
                     "BatchNormalization(renorm=True) (Keras's own)")
    run.add_argument("--protocol", choices=tuple(PROTOCOLS),
                     help="hyperparameters (table below; default: seed)")
    run.add_argument("--name", type=run_name,
                     help="run name, for its files (default: "
                     "NORM-PROTOCOL-bBATCH_SIZE-sSEED, with before -sSEED: "
                     "-kK for --classes-per-batch K or -pairs for --sampling "
                     "pairs, then -vV for --virtual-batch-size V)")
    run.add_argument("--seed", type=nonnegative_int, metavar="SEED",
                     help="seed of initialization, shuffling, augmentation, "
                     "dropout and the --train-size subset; the same seed "
                     "repeats a CPU run (default: 0)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run from its last finished epoch, "
                     "with its saved configuration (only the speed flags "
                     "may change, and --epochs may grow); starts it if "
                     "nothing is saved")
    run.add_argument("--overwrite", action="store_true",
                     help="start the run again, replacing its files")


def add_data_flags(parser):
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", type=Path, metavar="DIR",
                      help="CIFAR-10 in the official python layout "
                      "(cifar-10-batches-py); default: $CIFAR10_DIR, "
                      "else Keras's downloader")
    data.add_argument("--train-size", type=positive_int, metavar="N",
                      help="train on a stratified subset of N of the "
                      "training images not held out for validation, drawn "
                      "with --seed (default: all of them, 45000)")
    data.add_argument("--val-from", choices=VAL_FROM,
                      help="where the validation images (each epoch's "
                      "val_* columns and the best weights' choice) come "
                      "from. train: a stratified split held out of the "
                      "training set, drawn with --seed (the same for every "
                      "run of a seed) and never trained on; test: a "
                      "stratified subset of the test set, the same for "
                      "every run, as the 2017 code did (then 'best' is "
                      "chosen on test images) (default: train)")
    data.add_argument("--val-size", type=positive_int, metavar="N",
                      help="validation images (default: 5000, a tenth of "
                      "the training set, with --val-from train; all 10000 "
                      "with --val-from test); the test accuracy is always "
                      "on all the test images")
    data.add_argument("--classes-per-batch", type=positive_int, metavar="K",
                      help="non-i.i.d. training batches: each from exactly K "
                      "classes, BATCH_SIZE / K images of each (the paper's "
                      "pairs: K = BATCH_SIZE / 2); K must divide "
                      "--batch-size; every training image is used once per "
                      "epoch; validation is unchanged (default: i.i.d. "
                      "batches, a random permutation each epoch); a "
                      "sampling of its own (recorded as sampling kK), so it "
                      "excludes --sampling")
    data.add_argument("--sampling", choices=SAMPLINGS,
                      help="iid: a random permutation each epoch, cut into "
                      "batches; pairs: the paper's non-i.i.d. batches, made "
                      "of pairs of images of one class, and within each "
                      "normalization group (--virtual-batch-size V, else "
                      "the whole batch) of V/2 pairs of V/2 distinct classes "
                      "where V/2 <= 10 (CIFAR-10's classes), spread as "
                      "evenly as possible over the classes beyond; needs an "
                      "even --batch-size and V; each training image at most "
                      "once per epoch (a class's odd image, and the few "
                      "pairs that no group can take at the end, wait for "
                      "the next epoch) (default: iid)")
    data.add_argument("--augment", action=argparse.BooleanOptionalAction,
                      help="4-pixel zero padding, random 32x32 crop and "
                      "horizontal flip")


def add_model_flags(parser):
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


def add_optimization_flags(parser):
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


def add_norm_flags(parser):
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


def add_measurement_flags(parser):
    """Settings that change what a run computes or records (--resume keeps
    them), unlike the speed settings."""
    study = parser.add_argument_group("virtual batches and measurements "
                                      "(--resume keeps them)")
    study.add_argument("--virtual-batch-size", type=positive_int,
                       metavar="V",
                       help="in training, each normalization "
                       "layer normalizes every group of V consecutive "
                       "examples of a batch with the group's own statistics "
                       "(ghost batch normalization; the epoch's last N mod V "
                       "examples are a smaller group; the moving statistics "
                       "take the mean over the groups, once a step); "
                       "inference is unchanged. renorm: "
                       "BatchRenormalization(virtual_batch_size=V), r and d "
                       "per group. batchnorm: Keras's BatchNormalization has "
                       "no virtual batches, so this is BatchRenormalization "
                       "with r_max 1, d_max 0 and no schedule (exactly batch "
                       "normalization of each group), with the same momentum "
                       "and epsilon. keras-renorm: refused. At most "
                       "--batch-size; with --devices N, V must divide the "
                       "per-device batch (no group straddles two devices) "
                       "(default: none, the whole batch)")
    study.add_argument("--track-corrections",
                       action=argparse.BooleanOptionalAction,
                       help="renorm's layers accumulate, inside each training "
                       "step, how far r and d are from 1 and 0 and how "
                       "often they are clipped; written per epoch and layer "
                       "to HISTORY_DIR/NAME.corrections.csv (default: on for "
                       "renorm)")
    study.add_argument("--train-mode-validation",
                       action=argparse.BooleanOptionalAction,
                       help="after each epoch, the validation images once "
                       "more with the normalization layers in training mode "
                       "(batch statistics, in batches and groups drawn like "
                       "the training batches, no state changed; dropout "
                       "off): columns val_loss_train_mode and "
                       "val_accuracy_train_mode, whose gap to val_loss and "
                       "val_accuracy is the one between training and "
                       "inference outputs (default: on with one device)")


def add_speed_flags(parser):
    speed = parser.add_argument_group("speed")
    speed.add_argument("--precision", choices=PRECISIONS,
                       help="Keras dtype policy: float32, or mixed (float16 "
                       "or bfloat16 computations, float32 variables; the "
                       "normalization's statistics are float32 either way); "
                       "mixed_float16 trains with a dynamic loss scale "
                       "(Keras's LossScaleOptimizer) (default: float32)")
    speed.add_argument("--jit-compile", choices=("auto", "on", "off"),
                       help="XLA/JIT compilation; auto: for TensorFlow on a "
                       "CPU, on where the CPU lacks AVX-512 (faster there, "
                       "slower with it), else Keras's choice "
                       "(default: auto)")
    speed.add_argument("--devices", type=devices_or_all, metavar="N",
                       help="data-parallel training on N local devices "
                       "(or all), with the jax backend: Keras's "
                       "distribution API (keras.distribution.DataParallel) "
                       "splits each --batch-size batch evenly across them "
                       "and runs one program, so every normalization "
                       "layer's batch statistics are those of the whole "
                       "batch (synchronized), as on one device; every batch "
                       "(the epoch's last too), --val-size, the test set "
                       "and --eval-batch-size must divide by N; the batches "
                       "are made on the host. Several hosts: start this "
                       "command on each, with the variables of "
                       "keras.distribution.initialize (README), and "
                       "--devices all (default: 1)")
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
                       help="training steps per call from Python into the "
                       "backend: the same steps, fewer round trips. With "
                       "jax and --input device, N steps are one compiled "
                       "program (jax.lax.scan over Keras's train step; "
                       "validation and test on the device too); elsewhere "
                       "Keras's loop (compile(steps_per_execution)), whose "
                       "progress bar moves N steps at a time; N > 1 needs "
                       "the tensorflow or jax backend. auto: 1 on a CPU and "
                       "with torch; on an accelerator the whole epoch with "
                       "jax and --input device, else "
                       f"min({AUTO_STEPS_PER_EXECUTION}, steps per epoch) "
                       "(default: auto)")


def add_output_flags(parser):
    output = parser.add_argument_group("output")
    output.add_argument("--history-dir", type=Path, metavar="DIR",
                        help="where the CSV and JSON go (default: history)")
    output.add_argument("--weights-dir", type=Path, metavar="DIR",
                        help="where the weights go (default: weights)")


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
