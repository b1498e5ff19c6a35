"""Several processes (hosts) training one run: data parallel over all their
devices with Keras's distribution API on JAX, started as Keras documents it,
one process per host with the same command and three variables:

  KERAS_DISTRIBUTION_JOB_ADDRESSES   host:port of process 0 (the coordinator)
  KERAS_DISTRIBUTION_NUM_PROCESSES   how many processes
  KERAS_DISTRIBUTION_PROCESS_ID      this one's index, 0 .. NUM_PROCESSES - 1

Every process draws the same global batches from the run's seed and feeds
its own contiguous share of each (Keras's JAX trainer assembles the global
batch from the processes' shares, process 0's first); validation and test
sets are shared the same way, so the metrics are those of the whole sets.
Process 0 alone writes the run's files and prints; the others keep what they
need (the best epoch's weights) in memory."""

import os
from dataclasses import dataclass

from experiment.cli import UsageError

ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
COUNT = "KERAS_DISTRIBUTION_NUM_PROCESSES"
INDEX = "KERAS_DISTRIBUTION_PROCESS_ID"


@dataclass(frozen=True)
class Processes:
    """This process's place among the run's processes."""

    count: int = 1
    index: int = 0

    @property
    def writer(self):
        """Whether this process writes the run's files and prints."""
        return self.index == 0

    def share(self, items):
        """This process's contiguous share of `items` (a batch, or an array
        of a batch plan's), all of them with one process."""
        if self.count == 1:
            return items
        size, left = divmod(len(items), self.count)
        if left:
            raise ValueError(f"{len(items)} items do not split into "
                             f"{self.count} equal shares")
        return items[self.index * size:(self.index + 1) * size]


def from_environment(environ=None):
    """The processes as the launcher's variables describe them; one process
    where KERAS_DISTRIBUTION_NUM_PROCESSES is unset or 1.

    Raises:
        UsageError: naming the variable that is wrong.
    """
    environ = os.environ if environ is None else environ
    count = positive_int(environ, COUNT, 1)
    if count == 1:
        return Processes()
    index = environ.get(INDEX)
    if index is None or not index.strip().isdigit() or int(index) >= count:
        raise UsageError(f"{INDEX} must be this process's index, 0 to "
                         f"{count - 1}, with {COUNT}={count}; it is "
                         f"{index!r}")
    if not environ.get(ADDRESSES, "").strip():
        raise UsageError(f"{ADDRESSES} must name process 0's host:port "
                         f"with {COUNT}={count}")
    return Processes(count, int(index))


def positive_int(environ, name, default):
    text = environ.get(name)
    if text is None or not text.strip():
        return default
    if not text.strip().isdigit() or int(text) < 1:
        raise UsageError(f"{name} must be a positive integer: {text!r}")
    return int(text)


def connect(processes):
    """Joins the run's other processes (before JAX computes anything): Keras
    reads the three variables and starts jax.distributed."""
    import keras

    if processes.count > 1:
        keras.distribution.initialize()


def check_same_start(processes, start):
    """All processes continue after the same epoch: with --resume, each one
    reads the run's state, so the run's folders must be shared by the hosts.

    Raises:
        RuntimeError: naming the epochs the processes found.
    """
    if processes.count == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    starts = np.asarray(multihost_utils.process_allgather(
        np.int32(start))).reshape(-1).tolist()
    if len(set(starts)) > 1:
        raise RuntimeError(
            "the processes would continue after different epochs "
            f"({', '.join(f'process {i}: {s}' for i, s in enumerate(starts))}"
            "); --resume needs the run's history and weights folders shared "
            "by every host")
