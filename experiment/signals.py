"""SIGINT and SIGTERM during a run: the first raises an exception while it
trains (held back while an epoch is written to disk); any later one is
ignored, so that the shutdown that the first began (saving, the message,
the exit code) finishes."""

import signal
import threading
from contextlib import contextmanager

# The signals that arrived inside interrupts_as_exceptions (the first one
# raised; the others are ignored).
_arrived = []


class Interrupted(BaseException):
    """A SIGINT or SIGTERM arrived."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def interrupts_as_exceptions(exiting=False):
    """The first SIGINT or SIGTERM raises `Interrupted`; later ones are
    ignored. The previous handlers are restored on exit; with `exiting`
    (a process that ends after the block), not once one has arrived: the
    later ones stay ignored, also between the block and the exit."""

    def handler(signum, frame):
        _arrived.append(signum)
        if len(_arrived) == 1:
            raise Interrupted(signum)

    _arrived.clear()
    previous = {s: signal.signal(s, handler) for s in _signals()}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, signal.SIG_IGN if exiting and _arrived
                          else old)


@contextmanager
def interrupts_deferred():
    """SIGINT and SIGTERM wait until the block (an epoch's commit) is done;
    then the first of them raises `Interrupted` (if none came before)."""
    pending = []
    previous = {s: signal.signal(s, lambda n, f: pending.append(n))
                for s in _signals()}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    if pending and not _arrived:
        _arrived.extend(pending)
        raise Interrupted(pending[0])


def _signals():
    if threading.current_thread() is not threading.main_thread():
        return ()
    return (signal.SIGINT, signal.SIGTERM)
