"""Where and how a run computes: the backend, device and versions, the
speed settings resolved for them (jit_compile, --input,
--steps-per-execution), the Keras session of a run, and the clock of its
epochs."""

import datetime
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
# What counts as the code for `provenance`'s "dirty" (not the histories and
# plots that runs rewrite).
CODE_FILES = (":(glob)**/*.py", "requirements.txt", "pyproject.toml",
              "Makefile")
# --steps-per-execution auto on an accelerator, where Keras's loop runs the
# steps: at most this many steps per call from Python into the backend.
AUTO_STEPS_PER_EXECUTION = 64


def describe_environment():
    """Backend, device and versions: the one framework-specific fast path."""
    import keras

    backend = keras.backend.backend()
    versions = {"python": platform.python_version(), "keras": keras.__version__,
                "numpy": np.__version__}
    try:
        import batch_renorm

        versions["batch_renorm"] = batch_renorm.__version__
    except (ImportError, AttributeError):
        pass
    device_type, device = "cpu", None
    if backend == "tensorflow":
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            device_type = "gpu"
            device = details.get("device_name", gpus[0].name)
    elif backend == "jax":
        import jax
        import jaxlib

        versions["jax"] = jax.__version__
        versions["jaxlib"] = jaxlib.__version__
        first = jax.devices()[0]
        if first.platform != "cpu":
            device_type, device = first.platform, first.device_kind
    elif backend == "torch":
        import torch

        versions["torch"] = torch.__version__
        if torch.cuda.is_available():
            device_type, device = "gpu", torch.cuda.get_device_name(0)
    if device is None:
        cores = (len(os.sched_getaffinity(0))
                 if hasattr(os, "sched_getaffinity") else os.cpu_count())
        device = f"CPU: {cpu_name()}, {cores} cores"
    else:
        device = f"{device_type.upper()}: {device}"
    return {"backend": backend, "device": device, "device_type": device_type,
            "versions": versions}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def jit_compile(choice, environment):
    """--jit-compile: `auto` is Keras's choice, except for TensorFlow on a
    CPU (where Keras turns XLA off): XLA there where the CPU lacks AVX-512,
    TensorFlow's own (oneDNN) kernels where it has it or where its flags
    cannot be read (docs/speed.md)."""
    if choice in ("on", "off"):
        return choice == "on"
    if (environment["backend"], environment["device_type"]) == (
            "tensorflow", "cpu"):
        from batch_renorm import cpu_has_avx512  # imports Keras: not before
        return cpu_has_avx512() is False
    return "auto"


def resolve_input(choice, environment, devices=1):
    """--input: `auto` is `device` on an accelerator (GPU, TPU), where it
    spares the host loop the pixel work and the copies, and `host` on a CPU,
    where the device is the host and NumPy is as fast, and with TensorFlow,
    whose Keras trainer feeds a generator through tf.data.from_generator:
    that copies every device batch back to the host (slower on a CPU,
    docs/speed.md); `host` for data parallel training (Keras
    splits host batches across the devices)."""
    if choice == "device" and devices > 1:  # --devices all, resolved
        raise UsageError(f"--input device needs one device, not --devices "
                         f"{devices} (leave --input at auto or host)")
    if choice != "auto":
        return choice
    if (environment["device_type"] == "cpu" or devices > 1
            or environment["backend"] == "tensorflow"):
        return "host"
    return "device"


def configured_backend():
    """The backend Keras will run on, by Keras's own rule but without
    importing it (which starts the backend): $KERAS_BACKEND, else the
    "backend" of keras.json in $KERAS_HOME (default ~/.keras), else
    tensorflow."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = Path(os.environ.get("KERAS_HOME",
                               Path.home() / ".keras")).expanduser()
    try:
        return json.loads((home / "keras.json").read_text()).get(
            "backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def resolve_devices(choice, processes=1):
    """--devices as a number: `all` is every device (of every process, with
    several); more than one needs the jax backend (Keras's distribution API)
    and that many devices."""
    import keras

    backend = keras.backend.backend()
    if choice == 1 and processes == 1:
        return 1
    if backend != "jax":
        raise UsageError(
            f"--devices {choice} needs the jax backend (Keras's "
            f"distribution API for data parallel training); the backend is "
            f"{backend}")
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
    """--steps-per-execution: `auto` is 1 on a CPU (a step takes long next
    to the Python loop) and with torch (whose Keras trainer runs one step per
    call); on an accelerator, the whole epoch with jax and the training set
    on the device (`input`; one compiled program an epoch:
    experiment/compiled_epoch.py), else enough steps per call to amortize
    the loop, at most an epoch's. The same `steps` steps are trained
    whatever the value: the last call of an epoch runs the steps left."""
    if choice == "auto":
        if environment["device_type"] == "cpu" or (
                environment["backend"] == "torch"):
            return 1
        if environment["backend"] == "jax" and input == "device":
            return steps
        return min(steps, AUTO_STEPS_PER_EXECUTION)
    if choice > 1 and environment["backend"] == "torch":
        raise UsageError(
            f"--steps-per-execution {choice} needs the tensorflow or jax "
            "backend (Keras's torch trainer runs one step per call); use 1 "
            "or auto")
    return choice


@contextmanager
def keras_settings(config):
    """A fresh Keras session with the run's seed, dtype policy and, with
    several devices, the data parallel distribution; the policy and the
    distribution are restored afterwards (for callers in the same process,
    like tests)."""
    import keras

    policy = keras.config.dtype_policy()
    keras.backend.clear_session()
    with quiet_startup():  # it imports TensorFlow to seed it, on any backend
        keras.utils.set_random_seed(config["seed"])
    keras.config.set_dtype_policy(config["precision"])
    if config["devices"] > 1:
        # auto_shard_dataset: Keras would shard only a tf.data.Dataset (and
        # refuse train.py's generator); each process feeds its own share.
        keras.distribution.set_distribution(keras.distribution.DataParallel(
            devices=keras.distribution.list_devices()[:config["devices"]],
            auto_shard_dataset=False))
    try:
        yield
    finally:
        keras.config.set_dtype_policy(policy)
        if config["devices"] > 1:
            keras.distribution.set_distribution(None)


def epoch_clock():
    """A Keras callback that times an epoch's training steps, stopping the
    clock once the device is done (defined here so Keras is imported late)."""
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
    """A Keras callback that, before each training and evaluation batch,
    raises a signal's interruption that the code it interrupted swallowed
    (signals.raise_if_interrupted). Batch-begin hooks run on the main
    thread and leave Keras's asynchronous batch-end dispatch on."""
    import keras

    class InterruptionChecks(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            raise_if_interrupted()

        def on_test_batch_begin(self, batch, logs=None):
            raise_if_interrupted()

    return InterruptionChecks()


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")


def provenance(environment):
    """Which code made a run: the git commit of this checkout (None outside
    git), whether the code differed from it (`dirty`: uncommitted changes to
    CODE_FILES), and the package version."""
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
