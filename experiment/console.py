"""What train.py prints: the run's description, the per-epoch table, an
interruption's last line, and the commands that repeat or resume the run."""

import shlex
import signal
import sys

PROG = "train.py"


class Table:
    """The per-epoch table on stdout (COLUMNS: title, width, format)."""

    COLUMNS = {"epoch": ("epoch", 5, ""), "seconds": ("train_s", 8, ".1f"),
               "eval_seconds": ("eval_s", 7, ".1f"),
               "loss": ("loss", 7, ".4f"), "accuracy": ("acc", 6, ".4f"),
               "val_loss": ("val_loss", 8, ".4f"),
               "val_accuracy": ("val_acc", 7, ".4f"),
               "val_loss_train_mode": ("val_loss_t", 10, ".4f"),
               "val_accuracy_train_mode": ("val_acc_t", 9, ".4f"),
               "lr": ("lr", 8, ".2e"), "r_max": ("r_max", 5, ".2f"),
               "d_max": ("d_max", 5, ".2f")}

    def __init__(self, header):
        self.header = header
        print("  ".join(self.COLUMNS[c][0].rjust(self.COLUMNS[c][1])
                        for c in header), flush=True)

    def print_row(self, row):
        print("  ".join(
            format(float(row[c]) if spec else row[c], spec).rjust(width)
            for c in self.header for _, width, spec in [self.COLUMNS[c]]),
            flush=True)


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
                "images each)" if classes else
                " of pairs of a class" if config["sampling"] == "pairs"
                else " (i.i.d.)")
    if config["virtual_batch_size"] is not None:
        sampling += (f", normalized in groups of "
                     f"{config['virtual_batch_size']} (virtual batches)")
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
        f"{config['val_size']} validation images "
        + ("(held out of the training set)" if config["val_from"] == "train"
           else "(test images)") + f", precision {config['precision']}"
        f"{schedule}\n"
        f"  Keras {environment['versions']['keras']}, backend "
        f"{environment['backend']}, {environment['device']}"
        + (f", data parallel on {config['devices']} devices "
           f"({config['batch_size'] // config['devices']} images each, "
           "synchronized statistics)" if config["devices"] > 1 else "")
        + "\n"
        f"  batches made on the {config['input']} (--input), "
        f"{config['steps_per_execution']} training step"
        f"{'s' if config['steps_per_execution'] > 1 else ''} per execution "
        f"(--steps-per-execution): {environment['training_loop']}"
    )


def interrupted(signum, what):
    """The line that ends an interrupted run: the signal, then `what` (on a
    terminal, after the progress bar's line)."""
    return ("\n" if sys.stdout.isatty() else "") + (
        f"{PROG}: interrupted ({signal.Signals(signum).name}){what}")


def command_line(argv):
    return shlex.join(["python", PROG, *argv])


def resume_command(argv):
    argv = [a for a in argv if a != "--overwrite"]
    if "--resume" not in argv:
        argv.append("--resume")
    return command_line(argv)
