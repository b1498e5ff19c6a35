"""experiment/compiled_epoch.py, train.py's JAX fast path: N training steps
in one compiled program over Keras's own stateless step, evaluation in one
call a pass; the program's shape, its agreement with Keras's loop, the
samplings and virtual batches on it, and an interruption in a compiled
epoch (tiny fake CIFAR-10 files and WRN-10-1, on JAX)."""

import json
import os
import re
import signal
import time

import keras
import numpy as np
import pytest

from experiment import cifar10
from experiment import compiled_epoch
from experiment import loops
from experiment import network
from experiment import preprocessing
import train
from test_device_data import numbers
from test_device_data import run_args
from train_runs import read_history
from train_runs import run_main
from train_runs import without_timings

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax",
                                reason="the JAX fast path")


@pytest.fixture(scope="module")
def epochs(data_dir):
    """CompiledEpochs of a tiny run (5 steps of 20 augmented images, 3 per
    call), its model built and compiled as train.py does."""
    config, _, _ = train.parse_args(run_args(
        data_dir, data_dir, "unit", "--input", "device",
        "--steps-per-execution", "3", "--eval-batch-size", "10"))
    arrays = preprocessing.prepare(config, data_dir)
    model = network.build_model(config)
    model.compile(optimizer=network.make_optimizer(config),
                  loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    network.build_training_state(model, arrays.x_val[:1], arrays.y_val[:1])
    return compiled_epoch.CompiledEpochs(model, config, arrays, 5)


def test_one_program_with_a_loop_around_the_whole_step(epochs):
    """On an accelerator the N steps are one XLA module whose while loop
    holds the whole training step: the batch's gather, the convolutions
    and their gradients, the optimizer's update (the optimized HLO, as
    XLA_FLAGS=--xla_dump_to would write it)."""
    import jax

    state = epochs.state()
    plan = np.zeros((3, 4, 20), np.int32)
    epochs.unrolled = False  # as on a GPU (a CPU unrolls the steps, as the
    # runs below do)
    loop = jax.jit(epochs._train_steps).lower(
        state, plan, epochs.train_set.tensors()).compile().as_text()
    epochs.unrolled = True
    assert loop.count("HloModule ") == 1
    body = re.search(r"\bwhile\(.*?body=%?([\w.\-]+)", loop).group(1)
    body_text = computation(loop, body)
    for op in ("gather", "convolution", "sqrt"):  # sqrt: Adam's update
        assert op in body_text or any(
            op in computation(loop, called)
            for called in re.findall(r"calls=%?([\w.\-]+)", body_text)), op


def computation(hlo, name):
    """The text of HLO computation `name` (to its closing brace)."""
    start = re.search(rf"^\s*(ENTRY )?%?{re.escape(name)} ", hlo, re.M)
    return hlo[start.start():hlo.index("\n}", start.start())]


def test_evaluation_is_kerass_evaluate(epochs, data_dir):
    """One call over whole batches of 10 and the last 3: Keras's loss and
    accuracy of model.evaluate with the same batch size."""
    data = cifar10.load(data_dir)
    mean, std = preprocessing.channel_stats(data.x_train)
    x = preprocessing.normalize(data.x_test[:23], mean, std)
    y = data.y_test[:23]
    logs, seconds = epochs.evaluate(epochs.resident(x, y))
    expected = epochs.model.evaluate(x, y, batch_size=10, verbose=0,
                                     return_dict=True)
    assert sorted(logs) == sorted(expected)
    assert logs == pytest.approx(expected, rel=1e-5)
    assert seconds > 0


def test_which_loop_runs():
    """Whole compiled epochs on JAX with the data on the device and N > 1;
    Keras's loop otherwise, with a line where N > 1 was asked for."""
    jax_gpu = {"backend": "jax", "device_type": "gpu"}

    def choose(environment=jax_gpu, jit=True, **config):
        return loops.choose(dict({"steps_per_execution": 8,
                                  "input": "device"}, **config),
                            environment, jit)

    assert choose() == (loops.COMPILED, None)
    assert choose(steps_per_execution=1) == (loops.KERAS, None)
    assert choose({"backend": "tensorflow", "device_type": "gpu"}) == (
        loops.KERAS, None)
    name, why = choose(input="host")
    assert name == loops.KERAS and (
        "--steps-per-execution 8 with --input host runs Keras's loop" in why)
    assert "--jit-compile off" in choose(jit=False)[1]


SAMPLINGS = {"pairs": ("--sampling", "pairs", "--virtual-batch-size", "4"),
             "classes": ("--classes-per-batch", "5", "--norm-momentum", "0.5")}
LOOPS = {"keras": ("--input", "host"),
         "compiled": ("--input", "device", "--steps-per-execution", "2")}


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """Runs a sampling on a loop once for the module; the runs' folder."""
    out = tmp_path_factory.mktemp("runs")

    def run_once(sampling, loop):
        if not (out / "history" / f"{sampling}-{loop}.csv").exists():
            assert run_main(run_args(data_dir, out, f"{sampling}-{loop}",
                                     *SAMPLINGS[sampling], *LOOPS[loop])) == 0
        return out
    return run_once


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_samplings_and_virtual_batches_compiled(run, sampling):
    """The compiled path trains what Keras's loop trains, also with pairs,
    virtual batches and K classes per batch (float rounding apart)."""
    out = run(sampling, "keras")
    compiled = read_history(run(sampling, "compiled"), f"{sampling}-compiled")
    assert numbers(compiled) == pytest.approx(
        numbers(read_history(out, f"{sampling}-keras")), rel=1e-3)
    record = json.loads(
        (out / "history" / f"{sampling}-compiled.json").read_text())
    session = record["sessions"][0]
    assert session["training_loop"] == (
        "2 steps per compiled call (jax.lax.scan)")
    # The statistics the layers compute on this device, recorded.
    from batch_renorm import BatchRenormalization

    assert session["statistics_formulation"] == (
        BatchRenormalization().statistics_formulation)


def test_interrupt_in_a_compiled_epoch_and_resume(data_dir, tmp_path, run,
                                                  monkeypatch, capsys):
    """SIGINT after the first call of epoch 2: epoch 1 is saved, epoch 2
    is not, and --resume gives the uninterrupted run's history (pairs in
    virtual batches, several calls an epoch)."""
    args = run_args(data_dir, tmp_path, "run", *SAMPLINGS["pairs"],
                    *LOOPS["compiled"])
    original = compiled_epoch.CompiledEpochs.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        steps, train_epoch, epochs = self.train_steps, self.train_epoch, []

        def interrupting(*args):
            result = steps(*args)
            if len(epochs) == 2:  # the second epoch
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler runs here
            return result

        self.train_steps = interrupting
        self.train_epoch = lambda epoch: (epochs.append(epoch),
                                          train_epoch(epoch))[1]

    monkeypatch.setattr(compiled_epoch.CompiledEpochs, "__init__", init)
    assert run_main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted (SIGINT) in epoch 2 of 2" in err
    assert "epochs 1-1 are saved" in err
    assert [r["epoch"] for r in read_history(tmp_path, "run")] == ["1"]
    monkeypatch.undo()

    assert run_main(args + ["--resume"]) == 0
    assert "resuming run run after epoch 1 of 2" in capsys.readouterr().out
    assert without_timings(read_history(tmp_path, "run")) == without_timings(
        read_history(run("pairs", "compiled"), "pairs-compiled"))
