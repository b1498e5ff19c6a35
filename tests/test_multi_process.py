"""Several processes training one run (train.py started on each host with
the variables of keras.distribution.initialize), as 2 local processes of 2
virtual CPU devices each: the run is the run of 1 process on 4 devices,
only process 0 writes, --resume needs the folders shared, and the
launcher's variables are checked in one line."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import pytest

import numpy as np

from experiment import hosts
from experiment import sampling
from train_runs import one_error_line
from train_runs import tiny_args

ROOT = Path(__file__).resolve().parent.parent
JAX = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=str(ROOT))
only_on_jax = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="JAX subprocesses (jax.distributed); run once, on the jax pass")
TIMEOUT = 300  # a process left alone waits for the others: never forever


@pytest.mark.backend_independent
def test_the_shares_of_the_processes_make_up_each_batch():
    """Each process's batches, augmented, put together in process order,
    are the batches of one process: the same images, crops and order."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 40).astype("int32")

    def epoch(processes):
        return list(sampling.train_batches(
            images, labels, 12, np.float32(100), np.float32(50),
            sampling.epoch_rng(3, 1), augmented=True,
            share=processes.share))

    whole = epoch(hosts.Processes())
    shares = [epoch(hosts.Processes(2, i)) for i in (0, 1)]
    assert [len(y) for _, y in shares[1]] == [6, 6, 6, 2]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *shares):
        np.testing.assert_array_equal(np.concatenate([x0, x1]), x)
        np.testing.assert_array_equal(np.concatenate([y0, y1]), y)
    with pytest.raises(ValueError, match="5 items do not split into 2"):
        hosts.Processes(2, 1).share(np.arange(5))


def args_of(data_dir, out, *extra):
    # lr 1e-12: Adam turns the last bits of the all-reduced gradients (whose
    # order of summation differs between 1 and 2 processes) into whole steps
    # of size lr; with no steps, every figure tests the data and the
    # statistics, to the last printed digit.
    return tiny_args(data_dir, out, "--epochs", "2", "--batch-size", "20",
                     "--val-size", "20", "--eval-batch-size", "20",
                     "--name", "run", "--devices", "all", "--lr", "1e-12",
                     *extra)


def free_port():
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def run_processes(args_of_process, count=2, devices=2):
    """train.py in `count` processes of `devices` CPU devices each, joined
    by jax.distributed; their results (returncode, stdout, stderr)."""
    port = free_port()
    started = []
    for index in range(count):
        env = dict(JAX, XLA_FLAGS="--xla_force_host_platform_device_count="
                   f"{devices}", KERAS_DISTRIBUTION_JOB_ADDRESSES=
                   f"localhost:{port}",
                   KERAS_DISTRIBUTION_NUM_PROCESSES=str(count),
                   KERAS_DISTRIBUTION_PROCESS_ID=str(index))
        started.append(subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args_of_process(index)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    try:
        return [subprocess.CompletedProcess(p.args, p.wait(TIMEOUT),
                                            *p.communicate())
                for p in started]
    finally:
        for process in started:
            process.kill()


def one_process(args):
    env = dict(JAX, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


@pytest.fixture(scope="module")
def one_process_run(data_dir, tmp_path_factory):
    """The folder of the run that 1 process trains on 4 devices: what the
    runs of 2 processes must equal."""
    out = tmp_path_factory.mktemp("one")
    one = one_process(args_of(data_dir, out))
    assert one.returncode == 0, one.stderr[-3000:]
    return out


def files_of(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                  if p.is_file())


@only_on_jax
def test_two_processes_train_the_run_of_one_on_all_the_devices(
        data_dir, one_process_run, tmp_path):
    """2 processes x 2 devices and 1 process x 4 devices: the same history
    and test accuracy, the same last weights; process 0 writes every file
    and prints the table, process 1 writes nothing and prints no table."""
    results = run_processes(lambda i: args_of(data_dir, tmp_path / f"p{i}"))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    first, second = results
    assert "val_acc" in first.stdout and "test accuracy" in first.stdout
    assert second.stdout == ""
    assert not (tmp_path / "p1").exists()
    assert files_of(tmp_path / "p0") == files_of(one_process_run)

    def strip(csv_text):  # the timing columns differ
        return [line.split(",")[3:] for line in csv_text.splitlines()]

    history = [(d / "history" / "run.csv").read_text()
               for d in (one_process_run, tmp_path / "p0")]
    assert strip(history[0]) == strip(history[1])
    records = [json.loads((d / "history" / "run.json").read_text())
               for d in (one_process_run, tmp_path / "p0")]
    assert records[0]["result"] == records[1]["result"]
    assert (records[1]["processes"], records[1]["per_process_batch"],
            records[1]["per_device_batch"], records[1]["devices"]) == (
                2, 10, 5, 4)
    assert records[1]["statistics"] == (
        "of the whole batch, synchronized across the 4 devices of the 2 "
        "processes")
    assert records[0]["processes"] == 1


@only_on_jax
def test_resume_continues_both_processes_from_shared_folders(
        data_dir, one_process_run, tmp_path):
    """One epoch, then --resume to two: the history of two epochs at once;
    a process that finds no saved state (folders not shared) stops both,
    naming the epochs each would continue after."""
    shared = tmp_path / "shared"
    for extra in (["--epochs", "1"], ["--resume"]):
        for result in run_processes(
                lambda i, extra=extra: args_of(data_dir, shared, *extra)):
            assert result.returncode == 0, result.stderr[-3000:]
    rows = [(d / "history" / "run.csv").read_text().splitlines()
            for d in (one_process_run, shared)]
    assert [r.split(",")[3:] for r in rows[0]] == [
        r.split(",")[3:] for r in rows[1]]
    # Process 1 with folders of its own: it would start from scratch.
    mismatched = run_processes(lambda i: args_of(
        data_dir, shared if i == 0 else tmp_path / "own", "--resume",
        "--epochs", "3"))
    for result in mismatched:  # (after TensorFlow's log lines, if any)
        assert result.returncode == 1, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        assert ("error: the processes would continue after different epochs "
                "(process 0: 2, process 1: 0)") in result.stderr.strip(
                    ).splitlines()[-1]
    assert (shared / "history" / "run.csv").read_text().splitlines() == (
        rows[1])  # nothing written


@only_on_jax
@pytest.mark.parametrize("environ, extra, words", [
    ({"KERAS_DISTRIBUTION_PROCESS_ID": "2"}, [],
     "KERAS_DISTRIBUTION_PROCESS_ID must be this process's index, 0 to 1"),
    ({"KERAS_DISTRIBUTION_NUM_PROCESSES": "two"}, [],
     "KERAS_DISTRIBUTION_NUM_PROCESSES must be a positive integer: 'two'"),
    ({"KERAS_DISTRIBUTION_JOB_ADDRESSES": ""}, [],
     "KERAS_DISTRIBUTION_JOB_ADDRESSES must name process 0's host:port"),
    ({}, ["--devices", "1"],
     ("2 processes (KERAS_DISTRIBUTION_NUM_PROCESSES) train one run data "
      "parallel over all their devices: pass --devices all")),
])
def test_the_launchers_variables_are_checked(data_dir, tmp_path, environ,
                                             extra, words):
    """Refused before any process waits for another: one line, exit 2."""
    args = [*args_of(data_dir, tmp_path), *extra]
    env = {**JAX, "KERAS_DISTRIBUTION_JOB_ADDRESSES": "localhost:1",
           "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
           "KERAS_DISTRIBUTION_PROCESS_ID": "1", **environ}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args],
                            cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT, check=False)
    assert result.returncode == 2
    assert words in one_error_line(result)
