"""The JAX fast path of train.py: an epoch's training steps, and each
evaluation pass, as a few compiled programs instead of a Python call per
step.

Keras's JAX trainer runs `steps_per_execution` steps as a Python loop around
a one-step compiled function: every step is a dispatch from the host, which
on a fast GPU takes longer than the step (the epoch then times Keras's loop,
not the network). Here the training set is on the device (`device_data`),
the host draws the epoch's batch plan (the same plan as `--input host` and
Keras's loop on the device), and one jitted call runs up to N steps with
`jax.lax.scan` over Keras's own stateless `model.train_step`: the same
batches, loss, optimizer, metrics and variables. The model's state goes in
and comes back (donated) between calls and is written to the model's
variables once the epoch ends, so an interrupted epoch leaves nothing half
done behind that train.py would save. Evaluation: the images on the device,
one call per pass (`lax.scan` over `model.test_step`, then the smaller last
batch in the same program).

On a CPU the steps are unrolled (the program is the N steps one after the
other): XLA:CPU runs the weight gradient of a convolution inside a loop
many times slower than outside one (docs/speed.md). Elsewhere the
program is one loop around the whole step.
"""

import sys
import time

from experiment import device_data
from experiment import protocols
from experiment import sampling
from experiment import train_mode
from experiment.signals import raise_if_interrupted


class CompiledEpochs:
    """train.py's loop (see `loops`) with compiled epochs: the model,
    compiled with its optimizer and metrics built; `config`: the run's
    (batch size, sampling, augmentation, seed, `steps_per_execution`
    steps per call, `eval_batch_size`); `arrays`: the run's data; `steps`:
    the steps of an epoch."""

    def __init__(self, model, config, arrays, steps):
        import jax

        self.model, self.config = model, config
        self.steps = steps
        self.train_set = device_data.DeviceTrainSet(
            arrays.x_train, arrays.y_train, arrays.mean, arrays.std,
            augmented=config["augment"])
        self.progress = sys.stdout.isatty()
        self.unrolled = jax.devices()[0].platform == "cpu"
        self.train_steps = jax.jit(self._train_steps, donate_argnums=0)
        self.evaluation = jax.jit(self._evaluation)
        self.train_mode_sums = jax.jit(
            lambda *args: train_mode.batch_sums(model, *args))

    # -------------------------------------------------------------- training
    def train_epoch(self, epoch):
        """Trains one epoch; its logs (Keras's metrics over the epoch) and
        seconds (the plan drawn, the steps run, the device finished)."""
        import jax

        config, model = self.config, self.model
        start = time.perf_counter()
        plans = self.train_set.epoch_plan(
            config["batch_size"], sampling.epoch_rng(config["seed"], epoch),
            classes_per_batch=config["classes_per_batch"],
            pairs=protocols.pairs_group(config),
            steps_per_call=config["steps_per_execution"])
        model.reset_metrics()
        state = variable_values(model.trainable_variables,
                                model.non_trainable_variables,
                                model.optimizer.variables,
                                model.metrics_variables)
        data = self.train_set.tensors()
        bar = self.progress_bar()
        done = 0
        for plan in plans:
            raise_if_interrupted()
            logs, state = self.train_steps(state, plan, data)
            done += len(plan)
            if bar is not None:  # waits for the device: a terminal only
                bar.update(done, [(k, float(v)) for k, v in logs.items()])
        logs = {key: float(value) for key, value in logs.items()}
        jax.block_until_ready(state)
        seconds = time.perf_counter() - start
        assign(state, model.trainable_variables,
               model.non_trainable_variables, model.optimizer.variables,
               model.metrics_variables)
        if bar is not None:
            print("\x1b[1A\x1b[2K", end="")  # the bar gives way
        return logs, seconds

    def _train_steps(self, state, plans, data):
        """`len(plans)` training steps in one program: the last step's logs
        (Keras's metrics accumulate over the epoch) and the new state."""
        import jax

        def step(state, plan):
            logs, state = self.model.train_step(
                state, self.train_set.batch(plan, data))
            return state, logs

        state, logs = jax.lax.scan(step, state, plans,
                                   unroll=self.unrolled or 1)
        return {key: value[-1] for key, value in logs.items()}, state

    def progress_bar(self):
        if not self.progress:
            return None
        import keras

        return keras.utils.Progbar(
            self.steps, stateful_metrics=["loss", "accuracy"])

    # ------------------------------------------------------------ evaluation
    def resident(self, x, y):
        """Normalized images and their labels, on the device once."""
        from keras import ops

        return ops.convert_to_tensor(x), ops.convert_to_tensor(y, "int32")

    def evaluate(self, data):
        """Keras's metrics over `data` (from `resident`) in inference mode,
        in batches of `eval_batch_size`: logs and seconds."""
        start = time.perf_counter()
        model = self.model
        model.reset_metrics()
        state = variable_values(model.trainable_variables,
                                model.non_trainable_variables,
                                model.metrics_variables)
        logs = self.evaluation(state, *data)
        logs = {key: float(value) for key, value in logs.items()}
        raise_if_interrupted()
        return logs, time.perf_counter() - start

    def evaluate_train_mode(self, batches):
        """`train_mode.evaluate`, a compiled call per batch."""
        logs = train_mode.evaluate(self.model, batches, self.train_mode_sums)
        raise_if_interrupted()
        return logs

    def _evaluation(self, state, x, y):
        """`model.test_step` over whole batches, then the smaller last one:
        the logs after the last (shapes are static: one program per data
        size)."""
        import jax

        size = self.config["eval_batch_size"]
        whole = x.shape[0] // size

        def step(state, batch):
            logs, state = self.model.test_step(state, batch)
            return state, logs

        if whole:
            batches = (x[:whole * size].reshape((whole, size) + x.shape[1:]),
                       y[:whole * size].reshape((whole, size)))
            state, logs = jax.lax.scan(step, state, batches)
            logs = {key: value[-1] for key, value in logs.items()}
        if x.shape[0] > whole * size:
            logs, state = self.model.test_step(
                state, (x[whole * size:], y[whole * size:]))
        return logs


def variable_values(*groups):
    """The state Keras's stateless steps take: each group's values."""
    return tuple([variable.value for variable in group] for group in groups)


def assign(state, *groups):
    for values, group in zip(state, groups):
        for variable, value in zip(group, values):
            variable.assign(value)
