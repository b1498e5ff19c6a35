"""One writer per run: an exclusive lock file holding the writer's pid, host
and command; a lock whose process is gone is reported and taken over."""

import json
import os
import socket
import time
from contextlib import contextmanager

from experiment.cli import UsageError

# An empty lock this old was left by a process killed as it made it.
EMPTY_LOCK_SECONDS = 10.0


@contextmanager
def run_lock(path, name, command, say):
    """Holds the lock `path` of run `name` (UsageError where a live process
    does); `say` prints a note of a stale lock."""
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
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and "pid" in holder else None


def take_over(path, name, say):
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
    """Whether the holder's process runs (on another host: assumed to)."""
    try:
        if holder.get("host") == socket.gethostname():
            os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True
