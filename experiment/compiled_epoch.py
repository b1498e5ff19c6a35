"""The JAX fast path (docs/experiment.md): `jax.lax.scan` over Keras's
stateless `train_step`, N steps of the epoch's plan per call; the variables
are written when the epoch ends (an interruption leaves nothing half done)."""

import sys
import time

from experiment import device_data
from experiment import sampling
from experiment import train_mode
from experiment.signals import raise_if_interrupted


class CompiledEpochs:
    """A `loops` loop; `model` compiled, its optimizer and metrics built."""

    def __init__(self, model, config, arrays, steps):
        import jax

        self.model, self.config, self.steps = model, config, steps
        self.train_set = device_data.DeviceTrainSet(
            arrays.x_train, arrays.y_train, arrays.mean, arrays.std,
            augmented=config["augment"])
        self.progress = sys.stdout.isatty()
        # XLA:CPU runs a convolution's weight gradient in a loop much slower.
        self.unrolled = jax.devices()[0].platform == "cpu"
        self.train_steps = jax.jit(self._train_steps, donate_argnums=0)
        self.evaluation = jax.jit(self._evaluation)
        self.train_mode_sums = jax.jit(
            lambda *args: train_mode.batch_sums(model, *args))

    def variables(self, training=True):
        """The variable groups of Keras's stateless train (or test) step."""
        model = self.model
        return ([model.trainable_variables, model.non_trainable_variables]
                + ([model.optimizer.variables] if training else [])
                + [model.metrics_variables])

    def state(self, training=True):
        return tuple([variable.value for variable in group]
                     for group in self.variables(training))

    def train_epoch(self, epoch):
        """Trains one epoch: its logs and seconds."""
        import jax
        import keras

        start = time.perf_counter()
        plans = self.train_set.epoch_plan(
            rng=sampling.epoch_rng(self.config["seed"], epoch),
            steps_per_call=self.config["steps_per_execution"],
            **sampling.options(self.config))
        self.model.reset_metrics()
        state, data, done = self.state(), self.train_set.tensors(), 0
        bar = self.progress and keras.utils.Progbar(
            self.steps, stateful_metrics=["loss", "accuracy"])
        for plan in plans:
            raise_if_interrupted()
            logs, state = self.train_steps(state, plan, data)
            done += len(plan)
            if bar:  # waits for the device: a terminal only
                bar.update(done, [(k, float(v)) for k, v in logs.items()])
        logs = {key: float(value) for key, value in logs.items()}
        jax.block_until_ready(state)
        seconds = time.perf_counter() - start
        for values, group in zip(state, self.variables()):
            for variable, value in zip(group, values):
                variable.assign(value)
        if bar:
            print("\x1b[1A\x1b[2K", end="")  # the bar gives way
        return logs, seconds

    def _train_steps(self, state, plans, data):
        """`len(plans)` steps in one program: the last logs, the state."""
        return _scan(lambda state, plan: self.model.train_step(
            state, self.train_set.batch(plan, data)), state, plans,
            self.unrolled or 1)

    def resident(self, x, y):
        from keras import ops

        return ops.convert_to_tensor(x), ops.convert_to_tensor(y, "int32")

    def evaluate(self, data):
        """Keras's metrics over `data` (`resident`): logs and seconds."""
        start = time.perf_counter()
        self.model.reset_metrics()
        logs = self.evaluation(self.state(training=False), *data)
        logs = {key: float(value) for key, value in logs.items()}
        raise_if_interrupted()
        return logs, time.perf_counter() - start

    def evaluate_train_mode(self, batches):
        return train_mode.evaluate(self.model, batches, self.train_mode_sums)

    def _evaluation(self, state, x, y):
        """`model.test_step` over the batches: the last logs."""
        size = self.config["eval_batch_size"]
        whole = x.shape[0] // size
        if whole:
            batches = (x[:whole * size].reshape((whole, size) + x.shape[1:]),
                       y[:whole * size].reshape((whole, size)))
            logs, state = _scan(self.model.test_step, state, batches)
        if x.shape[0] > whole * size:
            logs, state = self.model.test_step(
                state, (x[whole * size:], y[whole * size:]))
        return logs


def _scan(step, state, batches, unroll=1):
    """`step(state, batch)` -> (logs, state) over `batches` in one program
    (`jax.lax.scan`): the last logs and the state."""
    import jax

    state, logs = jax.lax.scan(lambda state, batch: step(state, batch)[::-1],
                               state, batches, unroll=unroll)
    return {key: value[-1] for key, value in logs.items()}, state
