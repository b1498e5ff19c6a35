"""A run's configuration, a dict of CONFIG_KEYS: the protocols (every
hyperparameter in one place), the other settings, the rules over them."""

import dataclasses
from dataclasses import dataclass

from experiment.cli import UsageError


@dataclass(frozen=True)
class Protocol:
    """Every hyperparameter, each overridden by its flag. The defaults: `seed`,
    the 2017 run (titu1994/BatchRenormalization), the paper's renorm steps."""

    epochs: int = 100
    batch_size: int = 128
    classes_per_batch: object = None  # K: K classes per batch
    optimizer: str = "adam"  # or "sgd"
    lr: float = 1e-3  # not scaled with batch_size
    lr_milestones: tuple = ()  # epochs after which lr is multiplied by gamma
    lr_gamma: float = 1.0
    sgd_momentum: float = 0.0  # SGD only
    nesterov: bool = False  # SGD only
    weight_decay: float = 0.0  # lambda: each gradient gains lambda * w
    augment: bool = False  # 4-pixel pad, random 32x32 crop, horizontal flip
    depth: int = 16  # WRN-depth-width
    width: int = 4
    dropout: float = 0.0
    norm_momentum: float = 0.99  # of the moving statistics, Keras's
    norm_epsilon: float = 1e-3
    r_max: float = 3.0  # renorm: final bounds and schedule (in steps) ...
    d_max: float = 5.0  # ... keras-renorm: fixed clipping at r_max, d_max
    warmup_steps: int = 5000
    r_max_steps: int = 40000
    d_max_steps: int = 25000
    renorm_schedule: object = None  # W,D,R: fractions of the run's steps


PROTOCOLS = {
    "seed": Protocol(),
    # The Wide ResNet paper's CIFAR recipe (Zagoruyko & Komodakis 2016),
    # with Torch's BN momentum (0.1, i.e. 0.9 here) and epsilon.
    "wrn": Protocol(
        epochs=200,
        optimizer="sgd",
        lr=0.1,
        lr_milestones=(60, 120, 160),
        lr_gamma=0.2,
        sgd_momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        augment=True,
        norm_momentum=0.9,
        norm_epsilon=1e-5,
    ),
}
PROTOCOL_KEYS = tuple(f.name for f in dataclasses.fields(Protocol))
# A run's settings besides --norm, --protocol, --name and its protocol's.
RUN_DEFAULTS = {
    "seed": 0,
    "train_size": None,  # all the training images not held out
    "val_from": "train",  # a held-out split; "test": test images, as in 2017
    "val_size": None,  # from train: 5,000 (a tenth); from test: all 10,000
    "precision": "float32",  # or a Keras mixed policy
    "jit_compile": "auto",
    "eval_batch_size": 500,
    "input": "auto",
    "steps_per_execution": "auto",
    "devices": 1,  # data parallel on this many local devices (JAX), or "all"
    "virtual_batch_size": None,  # V: statistics of groups of V examples
    "sampling": "iid",  # or "pairs"; "kK" from classes_per_batch K
    "track_corrections": None,  # NAME.corrections.csv; None: on for renorm
    "train_mode_validation": None,  # val_*_train_mode; None: on, 1 device
}
RUN_KEYS = ("norm", "protocol", "name", *RUN_DEFAULTS)
CONFIG_KEYS = RUN_KEYS + PROTOCOL_KEYS
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
SAMPLINGS = ("iid", "pairs")  # --sampling; --classes-per-batch K is kK
VAL_FROM = ("train", "test")
SCHEDULE_STEPS = ("warmup_steps", "d_max_steps", "r_max_steps")
# What --resume may change: --epochs and the settings that leave the math.
RESUMABLE_CHANGES = ("epochs", "jit_compile", "eval_batch_size", "input",
                     "steps_per_execution", "devices")


def flag(key):
    return "--" + key.replace("_", "-")


def default_name(config):
    """NORM-PROTOCOL-bBATCH[-kK|-pairs][-vV]-sSEED."""
    classes, virtual = config["classes_per_batch"], config["virtual_batch_size"]
    return (f"{config['norm']}-{config['protocol']}-b{config['batch_size']}"
            + (f"-k{classes}" if classes else "")
            + ("-pairs" if config["sampling"] == "pairs" else "")
            + (f"-v{virtual}" if virtual is not None else "")
            + f"-s{config['seed']}")


def pairs_group(config):
    """The normalization group that --sampling pairs fills, else None."""
    if config["sampling"] == "pairs":
        return config["virtual_batch_size"] or config["batch_size"]


def check_virtual_batch_size(config):
    """--virtual-batch-size fits --norm, --batch-size and --devices (all:
    checked once counted)."""
    virtual, batch = config["virtual_batch_size"], config["batch_size"]
    if virtual is None:
        return
    devices = 1 if config["devices"] == "all" else config["devices"]
    for wrong, why in (
            (config["norm"] == "keras-renorm", ("needs --norm batchnorm or "
             "renorm (keras-renorm has no virtual batches)")),
            (virtual > batch, f"is more than --batch-size {batch}"),
            (devices > 1 and batch // devices % virtual,
             (f"must divide the per-device batch {batch // devices} "
              f"(--batch-size {batch} / --devices {devices})"))):
        if wrong:
            raise UsageError(f"--virtual-batch-size {virtual} {why}")


def lr_at(config, epoch):
    """The learning rate of 0-based `epoch`."""
    drops = sum(epoch >= milestone for milestone in config["lr_milestones"])
    return config["lr"] * config["lr_gamma"] ** drops


def resolve_schedule(config, steps_per_epoch):
    """--renorm-schedule W,D,R: those fractions of the run's steps."""
    if config["renorm_schedule"] is None:
        return
    total = config["epochs"] * steps_per_epoch
    for key, share in zip(SCHEDULE_STEPS, config["renorm_schedule"]):
        config[key] = int(share * total + 0.5)


def check_schedule(config):
    for key in ("r_max_steps", "d_max_steps"):
        if 0 < config[key] < config["warmup_steps"]:
            raise UsageError(f"{flag(key)} {config[key]} must be 0 or >= "
                             f"--warmup-steps {config['warmup_steps']}")


def resumed_config(config, saved, explicit):
    """The saved configuration, with the changes --resume allows."""
    missing = [key for key in CONFIG_KEYS if key not in saved]
    if missing:
        raise RuntimeError("cannot resume: the saved configuration lacks "
                           + ", ".join(missing))
    resumed = {key: saved[key] for key in CONFIG_KEYS}
    for key, value in explicit.items():
        if key not in CONFIG_KEYS or key in RESUMABLE_CHANGES:
            continue
        value = list(value) if isinstance(value, tuple) else value
        if value != resumed[key]:
            saved_value = "not set" if resumed[key] is None else resumed[key]
            raise UsageError(
                f"{flag(key)} {value} differs from the saved configuration "
                f"of run {config['name']!r} ({saved_value}); leave it out to "
                "resume, or start a new run with another --name")
    for key in RESUMABLE_CHANGES:
        if key in explicit or key != "epochs":  # speed: resolved anew
            resumed[key] = config[key]
    if resumed["epochs"] < saved["epochs"]:
        raise UsageError(
            f"--epochs {resumed['epochs']} is fewer than the "
            f"{saved['epochs']} epochs of run {config['name']!r}; with "
            "--resume, --epochs may only grow")
    return resumed


def schedule_warnings(config, steps_per_epoch):
    """Where the renorm schedule does not fit the run, one line each
    (docs/experiment.md, "Schedule warnings")."""
    if config["norm"] != "renorm":
        return []
    from numpy import clip

    from batch_renorm import renorm_bounds, renorm_ramp  # imports Keras
    total = config["epochs"] * steps_per_epoch
    warmup = config["warmup_steps"]
    ends = (config["r_max_steps"], config["d_max_steps"])
    fix = ("; fit it to the run with --renorm-schedule 0.04,0.19,0.31 (the "
           "paper's fractions of its steps)")
    warnings = []
    if total <= warmup:
        warnings.append(
            f"the run's {total} steps end before the renorm warm-up "
            f"({warmup} steps): r_max stays 1 and d_max 0, "
            f"plain batch normalization throughout{fix}")
    elif min(renorm_ramp(total, warmup, end, clip=clip) for end in ends) < .5:
        r_end, d_end = renorm_bounds(total, config["r_max"], config["d_max"],
                                     warmup, *ends, clip=clip)
        warnings.append(
            f"the run's {total} steps end early in the renorm schedule: by "
            f"its end r_max reaches only {r_end:.2f} of {config['r_max']:g} "
            f"and d_max {d_end:.2f} of {config['d_max']:g}{fix}")
    settle = 3 / (1 - config["norm_momentum"])
    if 0 < total and warmup < min(settle, total):
        warnings.append(
            f"the renorm warm-up ({warmup} steps) is shorter than 3 time "
            f"constants of the moving averages ({settle:.0f} steps at "
            f"--norm-momentum {config['norm_momentum']:g}), which would not "
            "have settled; lengthen it or lower --norm-momentum")
    return warnings


def protocols_table():
    """The protocols side by side, a row per flag (for --help)."""
    def text(value):
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, tuple):
            return ",".join(map(str, value)) or "none"
        return "none" if value is None else str(value)

    rows = [("flag", *PROTOCOLS)] + [
        (flag(key), *(text(getattr(p, key)) for p in PROTOCOLS.values()))
        for key in PROTOCOL_KEYS]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
        for row in rows)
