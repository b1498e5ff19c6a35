"""TensorFlow's start-up lines kept off the terminal: importing it writes
absl's banner, oneDNN's notice and the CPU feature guard from C++ straight
to file descriptor 2, the first two whatever TF_CPP_MIN_LOG_LEVEL says. JAX
sets TF_CPP_MIN_LOG_LEVEL=1 where it is unset, so only 0 (show everything)
says the user wants them."""

import contextlib
import os
import re
import sys
import tempfile

# The known start-up lines, matched from a line's start: absl's banner; the
# INFO lines (absl's prefix `I<mmdd> <time> <thread> <file>:<line>] `) of
# the two files that log at import; the CPU feature guard's second line.
CHATTER = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called "
    rb"are written to STDERR"
    rb"|I\d{4} \S+ +\d+ (port|cpu_feature_guard)\.cc:\d+\] "
    rb"|To enable the following instructions: .* rebuild TensorFlow with "
    rb"the appropriate compiler flags")


@contextlib.contextmanager
def quiet_startup():
    """Runs the block with file descriptor 2 captured, then writes every
    captured line but CHATTER to stderr, and sets TF_CPP_MIN_LOG_LEVEL=1
    where unset (for later lines and child processes); not where it is 0."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip() == "0":
        yield
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    sys.stderr.flush()
    try:
        capture = tempfile.TemporaryFile()
        saved = os.dup(2)
    except OSError:  # no temporary file, or no stderr: nothing is hidden
        capture = None
    if capture is None:
        yield
        return
    with capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().splitlines(True)
                    if not CHATTER.match(line)]
            if kept:
                with open(2, "wb", closefd=False) as stderr:
                    stderr.write(b"".join(kept))
