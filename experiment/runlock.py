"""One writer per run: an exclusive lock file beside the run's history,
holding the writer's pid, host and command. A second writer of the same run
gets one line naming the holder; a lock whose process is gone (killed) is
reported and taken over."""

import json
import os
import socket
import time
from contextlib import contextmanager

from experiment.cli import UsageError

# A lock file still empty this long after it was made was left by a process
# killed between creating it and writing its holder.
EMPTY_LOCK_SECONDS = 10.0


@contextmanager
def run_lock(path, name, command, say):
    """Holds the lock file `path` of run `name` for the block; `say` prints
    a note (a stale lock taken over).

    Raises:
        UsageError: another live process holds it.
    """
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            take_over(path, name, say)  # or raises: the holder lives
    with os.fdopen(fd, "w") as file:
        file.write(json.dumps(me) + "\n")
    try:
        yield
    finally:
        if (read_holder(path) or {}).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)


def read_holder(path):
    """The lock's holder, or None where the file is empty or unreadable."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and "pid" in holder else None


def take_over(path, name, say):
    """Removes the lock `path` if its holder is gone (saying so); raises
    UsageError if it lives."""
    holder = read_holder(path)
    if holder is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile
        if age < EMPTY_LOCK_SECONDS:
            raise UsageError(
                f"run {name!r} is being started by another process (lock "
                f"{path}); wait for it, or delete that file if no process is")
        say(f"removing the empty lock {path} (left by a killed process)")
    elif holder_alive(holder):
        raise UsageError(
            f"run {name!r} is being written by process {holder['pid']} on "
            f"{holder.get('host')} since {holder.get('since')} (lock {path}); "
            "wait for it to end, or use another --name")
    else:
        say(f"removing the stale lock {path} of process {holder['pid']}, "
            "which is no longer running")
    path.unlink(missing_ok=True)


def holder_alive(holder):
    """Whether the holder's process still runs (on another host: assumed
    to)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True
