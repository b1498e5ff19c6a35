"""SIGINT and SIGTERM during a run: as an exception while it trains, held
back while an epoch is written to disk."""

import signal
import threading
from contextlib import contextmanager


class Interrupted(BaseException):
    """A SIGINT or SIGTERM arrived."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def interrupts_as_exceptions():
    """SIGINT and SIGTERM raise `Interrupted` (restored on exit)."""

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in _signals()}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextmanager
def interrupts_deferred():
    """SIGINT and SIGTERM wait until the block (an epoch's commit) is done."""
    pending = []
    previous = {s: signal.signal(s, lambda n, f: pending.append(n))
                for s in _signals()}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    if pending:
        raise Interrupted(pending[0])


def _signals():
    if threading.current_thread() is not threading.main_thread():
        return ()
    return (signal.SIGINT, signal.SIGTERM)
