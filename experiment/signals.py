"""SIGINT and SIGTERM during a run: the first raises `Interrupted` (held back
while an epoch is written); later ones are ignored, so that the shutdown the
first began finishes (docs/experiment.md, "Files of a run")."""

import os
import signal
import threading
from contextlib import contextmanager

# How long the watchdog waits for the main thread to take a signal.
STUCK_SECONDS = 30.0
_arrived = []  # the signals that arrived inside interrupts_as_exceptions
_taken = threading.Event()  # set once the main thread took a signal


class Interrupted(BaseException):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def interrupts_as_exceptions(exiting=False, on_stuck=None):
    """The first SIGINT or SIGTERM raises `Interrupted`, later ones are
    ignored (after the block too with `exiting`); one the main thread has not
    taken in STUCK_SECONDS calls `on_stuck(signum, seconds)`, then exits."""

    def handler(signum, frame):
        _taken.set()
        _arrived.append(signum)
        if len(_arrived) == 1:
            raise Interrupted(signum)

    _arrived.clear()
    signals = _signals()
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        with _watchdog(on_stuck if signals else None):
            yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, signal.SIG_IGN if exiting and _arrived
                          else old)


def raise_if_interrupted():
    """Raises again a signal's `Interrupted` that some code swallowed."""
    if _arrived:
        raise Interrupted(_arrived[0])


@contextmanager
def interrupts_deferred():
    """SIGINT/SIGTERM wait for the block, then raise `Interrupted` (once)."""
    pending = []

    def defer(signum, frame):
        _taken.set()
        pending.append(signum)

    previous = {s: signal.signal(s, defer) for s in _signals()}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    if pending and not _arrived:
        _arrived.extend(pending)
        raise Interrupted(pending[0])


@contextmanager
def _watchdog(on_stuck):
    """Told of each signal by the wakeup fd, even with the main thread stuck."""
    if on_stuck is None:
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # set_wakeup_fd requires it
    global _taken  # a new event: an earlier block's thread keeps its own
    _taken = taken = threading.Event()

    def watch():
        try:
            while byte := os.read(read_fd, 1):  # b"" once the block ended
                if not taken.wait(STUCK_SECONDS):
                    on_stuck(byte[0], STUCK_SECONDS)
                    os._exit(128 + byte[0])
        finally:
            os.close(read_fd)

    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=watch, name="signal watchdog", daemon=True).start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        os.close(write_fd)


def _signals():  # handlers can be set on the main thread only
    main = threading.current_thread() is threading.main_thread()
    return (signal.SIGINT, signal.SIGTERM) if main else ()
