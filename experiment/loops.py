"""How a run's epochs execute: Keras's loop or `compiled_epoch`. A loop has
`train_epoch(epoch)` and `evaluate(resident(x, y))` -> (logs of floats,
seconds with the device finished), `evaluate_train_mode(batches)` -> logs."""

import sys
import time

from experiment import runtime
from experiment import sampling
from experiment import train_mode
from experiment.signals import raise_if_interrupted

KERAS, COMPILED = "keras", "compiled"


def choose(config, environment, jit):
    """Which loop runs (KERAS or COMPILED), and a note where Keras's runs N."""
    steps = config["steps_per_execution"]
    if environment["backend"] != "jax" or steps == 1:
        return KERAS, None  # TensorFlow's trainer compiles its N steps
    why = ("--input host" if config["input"] != "device"
           else "--jit-compile off" if jit is False else None)
    if why is None:
        return COMPILED, None
    return KERAS, (
        f"--steps-per-execution {steps} with {why} runs Keras's loop (one "
        "compiled step per Python call); whole compiled epochs need "
        "--input device and XLA")


def describe(name, config):
    """The loop, as the run's description and its JSON session say it."""
    steps = config["steps_per_execution"]
    if name == COMPILED:
        return f"{steps} steps per compiled call (jax.lax.scan)"
    return f"Keras's loop, {steps} step{'s' if steps > 1 else ''} per call"


def make(name, model, config, arrays, steps, processes):
    if name == COMPILED:
        from experiment import compiled_epoch

        return compiled_epoch.CompiledEpochs(model, config, arrays, steps)
    return KerasLoop(model, config, arrays, steps, processes)


class KerasLoop:
    """`model.fit`, `model.evaluate`; each process feeds its share."""

    def __init__(self, model, config, arrays, steps, processes):
        self.model, self.steps = model, steps
        self.batches_of = epoch_batches(config, arrays, processes)
        self.eval_batch = config["eval_batch_size"] // processes.count
        self.clock = runtime.epoch_clock()
        self.checks = runtime.interruption_checks()
        self.progress = 1 if sys.stdout.isatty() else 0  # Keras's bar

    def train_epoch(self, epoch):
        history = self.model.fit(
            self.batches_of(epoch), steps_per_epoch=self.steps, epochs=1,
            shuffle=False, verbose=self.progress,
            callbacks=[self.clock, self.checks]).history
        if self.progress:
            print("\x1b[1A\x1b[2K", end="")  # the bar gives way
        return ({key: float(values[-1]) for key, values in history.items()},
                self.clock.seconds)

    def resident(self, x, y):
        return x, y

    def evaluate(self, data):
        start = time.perf_counter()
        logs = self.model.evaluate(*data, batch_size=self.eval_batch,
                                   verbose=0, return_dict=True,
                                   callbacks=[self.checks])
        raise_if_interrupted()
        return logs, time.perf_counter() - start

    def evaluate_train_mode(self, batches):
        return train_mode.evaluate(self.model, batches)


def epoch_batches(config, arrays, processes):
    """The epoch -> its training batches (host or device)."""
    options = sampling.options(config)
    if config["input"] == "device":
        from experiment import device_data

        resident = device_data.DeviceTrainSet(
            arrays.x_train, arrays.y_train, arrays.mean, arrays.std,
            augmented=config["augment"])
        return lambda epoch: resident.train_batches(
            rng=sampling.epoch_rng(config["seed"], epoch), **options)
    return lambda epoch: sampling.train_batches(
        arrays.x_train, arrays.y_train, mean=arrays.mean, std=arrays.std,
        rng=sampling.epoch_rng(config["seed"], epoch),
        augmented=config["augment"], share=processes.share, **options)
