"""Where and how a run computes: environment, speed settings, Keras session."""

import datetime
import importlib
import json
import os
import platform
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from experiment.cli import UsageError
from experiment.signals import raise_if_interrupted
from experiment.startup import quiet_startup

INPUTS = ("auto", "host", "device")
ROOT = Path(__file__).resolve().parents[1]
# The code for `provenance`'s "dirty" (not the histories and plots).
CODE_FILES = (":(glob)**/*.py", "requirements.txt", "pyproject.toml",
              "Makefile")
# --steps-per-execution auto's most on an accelerator with Keras's loop.
AUTO_STEPS_PER_EXECUTION = 64


def describe_environment():
    """Backend, device and versions."""
    import keras

    import batch_renorm

    backend = keras.backend.backend()
    framework = importlib.import_module(backend)  # tensorflow, jax, torch
    versions = {"python": platform.python_version(), "keras": keras.__version__,
                "numpy": np.__version__,
                "batch_renorm": batch_renorm.__version__,
                backend: framework.__version__}
    device_type, device = "cpu", None
    if backend == "tensorflow":
        if gpus := framework.config.list_physical_devices("GPU"):
            details = framework.config.experimental.get_device_details(gpus[0])
            device = details.get("device_name", gpus[0].name)
            device_type = "gpu"
    elif backend == "jax":
        versions["jaxlib"] = importlib.import_module("jaxlib").__version__
        first = framework.devices()[0]
        if first.platform != "cpu":
            device_type, device = first.platform, first.device_kind
    elif backend == "torch" and framework.cuda.is_available():
        device_type, device = "gpu", framework.cuda.get_device_name(0)
    cores = (len(os.sched_getaffinity(0))
             if hasattr(os, "sched_getaffinity") else os.cpu_count())
    device = (f"CPU: {cpu_name()}, {cores} cores" if device is None
              else f"{device_type.upper()}: {device}")
    return {"backend": backend, "device": device, "device_type": device_type,
            "versions": versions}


def cpu_name():
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines
             if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def jit_compile(choice, environment):
    """--jit-compile: `auto` is Keras's choice, but on TensorFlow on a CPU
    XLA where the CPU lacks AVX-512 (docs/speed.md)."""
    if choice in ("on", "off"):
        return choice == "on"
    if (environment["backend"], environment["device_type"]) == (
            "tensorflow", "cpu"):
        from batch_renorm import cpu_has_avx512  # imports Keras: not before
        return cpu_has_avx512() is False
    return "auto"


def resolve_input(choice, environment, devices=1):
    """--input: `auto` is `device` on one accelerator but with TensorFlow,
    else `host` (docs/experiment.md, "Input pipeline")."""
    if choice != "auto":
        return choice
    return "host" if (environment["device_type"] == "cpu" or devices > 1 or
                      environment["backend"] == "tensorflow") else "device"


def configured_backend():
    """The backend Keras will run on, found without importing Keras."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser()
    try:
        return json.loads((home / "keras.json").read_text()).get(
            "backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def resolve_devices(choice, processes=1):
    """--devices as a number (`all`: every device of every process); the
    flags have checked the backend and the processes' --devices all."""
    if choice == 1:
        return 1
    import keras

    available = len(keras.distribution.list_devices())
    if choice == "all":
        return available
    if processes > 1 and choice != available:
        raise UsageError(f"--devices {choice}: {processes} processes train "
                         f"on all their {available} devices; pass --devices "
                         "all")
    if choice > available:
        raise UsageError(f"--devices {choice} is more than the {available} "
                         "local device(s) JAX has")
    return choice


def resolve_steps_per_execution(choice, environment, steps, input="host"):
    """--steps-per-execution: `auto` is 1 on a CPU and with torch, else the
    epoch's `steps` (jax, --input device) or up to AUTO_STEPS_PER_EXECUTION."""
    if choice == "auto":
        if environment["device_type"] == "cpu" or (
                environment["backend"] == "torch"):
            return 1
        if environment["backend"] == "jax" and input == "device":
            return steps
        return min(steps, AUTO_STEPS_PER_EXECUTION)
    if choice > 1 and environment["backend"] == "torch":
        raise UsageError(f"--steps-per-execution {choice} needs tensorflow or "
                         "jax (Keras's torch trainer runs one step per call); "
                         "use 1 or auto")
    return choice


@contextmanager
def keras_settings(config):
    """A fresh Keras session with the run's seed, policy and distribution
    (restored afterwards: the policy; the distribution: none)."""
    import keras

    policy = keras.config.dtype_policy()
    keras.backend.clear_session()
    with quiet_startup():  # it imports TensorFlow to seed it, on any backend
        keras.utils.set_random_seed(config["seed"])
    keras.config.set_dtype_policy(config["precision"])
    keras.distribution.set_distribution(keras.distribution.DataParallel(
        devices=keras.distribution.list_devices()[:config["devices"]],
        auto_shard_dataset=False,  # each process feeds its own share
    ) if config["devices"] > 1 else None)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(policy)
        keras.distribution.set_distribution(None)


def epoch_clock():
    """A callback timing an epoch's steps until the device is done."""
    import keras

    class EpochClock(keras.callbacks.Callback):
        seconds = None

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            # Reading values that the last step wrote waits for the device.
            keras.ops.convert_to_numpy(self.model.optimizer.iterations)
            for value in (logs or {}).values():
                float(value)
            self.seconds = time.perf_counter() - self.start

    return EpochClock()


def interruption_checks():
    """A callback raising, before each batch, an interruption that some code
    swallowed (batch-begin hooks run on the main thread; ends stay async)."""
    import keras

    class InterruptionChecks(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            raise_if_interrupted()

        on_test_batch_begin = on_train_batch_begin

    return InterruptionChecks()


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")


def provenance(environment):
    """Which code made a run (docs/experiment.md, "Provenance")."""
    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--untracked-files=no", "--",
                  *CODE_FILES)
    return {"commit": commit, "dirty": None if commit is None else bool(
        changes), "version": environment["versions"].get("batch_renorm")}


def git(*args):
    """git's output in this checkout, stripped; None where git fails."""
    try:
        result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True,
                                text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None
