"""Several processes (hosts) training one run on JAX, each feeding its share
of every batch; process 0 alone writes (docs/experiment.md, "Several hosts")."""

import os
from dataclasses import dataclass

from experiment.cli import UsageError

ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
COUNT = "KERAS_DISTRIBUTION_NUM_PROCESSES"
INDEX = "KERAS_DISTRIBUTION_PROCESS_ID"


@dataclass(frozen=True)
class Processes:
    count: int = 1
    index: int = 0

    @property
    def writer(self):
        return self.index == 0

    def share(self, items):
        """This process's contiguous share of `items`."""
        size, left = divmod(len(items), self.count)
        if left:
            raise ValueError(f"{len(items)} items do not split into "
                             f"{self.count} equal shares")
        return items[self.index * size:(self.index + 1) * size]


def from_environment():
    """The processes the launcher's variables describe (one without COUNT)."""
    text = os.environ.get(COUNT, "").strip()
    if text and (not text.isdigit() or int(text) < 1):
        raise UsageError(f"{COUNT} must be a positive integer: "
                         f"{os.environ[COUNT]!r}")
    count = int(text or 1)
    if count == 1:
        return Processes()
    index = os.environ.get(INDEX)
    if index is None or not index.strip().isdigit() or int(index) >= count:
        raise UsageError(f"{INDEX} must be this process's index, 0 to "
                         f"{count - 1}, with {COUNT}={count}: {index!r}")
    if not os.environ.get(ADDRESSES, "").strip():
        raise UsageError(f"{ADDRESSES} must name process 0's host:port "
                         f"with {COUNT}={count}")
    return Processes(count, int(index))


def connect(processes):
    """Joins the run's other processes (before JAX computes anything)."""
    import keras

    if processes.count > 1:
        keras.distribution.initialize()


def check_same_start(processes, start):
    """RuntimeError unless all processes resume after the same epoch."""
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
