"""SIGINT and SIGTERM during a run: the first raises `Interrupted` while it
trains (held back while an epoch is written to disk); later ones are
ignored, so that the shutdown the first began (saving, the message, the
exit code) finishes."""

import os
import signal
import threading
from contextlib import contextmanager

# How long a signal may wait for the main thread before the watchdog ends
# the process: later signals are ignored, so nothing else would end a main
# thread that never comes back from the framework.
STUCK_SECONDS = 30.0

# The signals that arrived inside interrupts_as_exceptions.
_arrived = []
# Set by the Python-level handlers: the main thread took a signal.
_taken = threading.Event()


class Interrupted(BaseException):
    """A SIGINT or SIGTERM arrived."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def interrupts_as_exceptions(exiting=False, on_stuck=None):
    """The first SIGINT or SIGTERM raises `Interrupted`; later ones are
    ignored. The previous handlers are restored on exit; with `exiting` (a
    process that ends after the block) not once one has arrived, so that
    later ones stay ignored until the exit.

    `on_stuck(signum, seconds)`, if given, is called from a watchdog thread
    when the main thread has not taken a signal STUCK_SECONDS after it came
    (Python runs handlers only between its bytecodes); the process then
    ends at once with exit code 128 + signum. Finished epochs are safe:
    every file is written to a temporary and renamed."""

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
    """Raises `Interrupted` again for a signal that arrived inside
    interrupts_as_exceptions, for the training loop to call between steps:
    the code that the handler interrupted may have swallowed the exception
    (a finalizer or a callback from C catches everything)."""
    if _arrived:
        raise Interrupted(_arrived[0])


@contextmanager
def interrupts_deferred():
    """SIGINT and SIGTERM wait until the block (an epoch's commit) is done;
    then the first of them raises `Interrupted` (if none came before)."""
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
    """A thread that learns of each signal from Python's wakeup fd (written
    by the C-level handler, whatever the main thread does) and calls
    `on_stuck` and ends the process if no Python-level handler has run
    STUCK_SECONDS later."""
    if on_stuck is None:
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # set_wakeup_fd requires it
    seconds = STUCK_SECONDS
    # A new event for each watchdog: the thread of an earlier block that
    # reads its last byte late waits on its own event, not on this one.
    global _taken
    _taken = taken = threading.Event()

    def watch():
        try:
            while byte := os.read(read_fd, 1):  # b"" once the block ended
                if not taken.wait(seconds):
                    on_stuck(byte[0], seconds)
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


def _signals():
    if threading.current_thread() is not threading.main_thread():
        return ()
    return (signal.SIGINT, signal.SIGTERM)
