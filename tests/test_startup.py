"""experiment/startup.py: TensorFlow's start-up lines hidden while Keras is
imported, anything else written to stderr meanwhile still shown, nothing
hidden where TF_CPP_MIN_LOG_LEVEL is 0."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from experiment.startup import quiet_startup

ROOT = Path(__file__).resolve().parents[1]

# Independent of the backend (the first two tests import Keras on TensorFlow
# in a new process): they run once, in the tensorflow session.
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="independent of the backend: runs with tensorflow only")

# Inside the block: Keras (TensorFlow's real start-up lines), a line in the
# format of a known one, a line of another kind, a line from Python.
KNOWN = b"I0000 00:00:1.5   7 port.cc:153] a known start-up line\n"
OTHERS = b"E0000 an error from C++\n"
SCRIPT = f"""
import os, sys
from experiment.startup import quiet_startup
with quiet_startup():
    import keras
    os.write(2, {KNOWN!r})
    os.write(2, {OTHERS!r})
    print("a line from Python", file=sys.stderr)
print(keras.backend.backend(), os.environ["TF_CPP_MIN_LOG_LEVEL"])
"""
CHATTER = ("absl::InitializeLog", "port.cc", "cpu_feature_guard",
           "rebuild TensorFlow")
SHOWN = "E0000 an error from C++\na line from Python\n"


def import_keras(**environ):
    """SCRIPT's stdout and stderr in a new process, on TensorFlow."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(KERAS_BACKEND="tensorflow", PYTHONPATH=str(ROOT), **environ)
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env,
                            capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split(), result.stderr


def test_start_up_lines_are_hidden_and_other_lines_shown():
    out, err = import_keras()
    assert not [line for line in err.splitlines()
                if any(words in line for words in CHATTER)], err
    assert SHOWN in err
    # As JAX sets it: TensorFlow's later INFO lines hidden too.
    assert out == ["tensorflow", "1"]


def test_tf_cpp_min_log_level_0_hides_nothing():
    out, err = import_keras(TF_CPP_MIN_LOG_LEVEL="0")
    assert "absl::InitializeLog" in err  # TensorFlow's own start-up line
    assert KNOWN.decode() + SHOWN in err
    assert out == ["tensorflow", "0"]


@pytest.mark.parametrize("level", ["1", "3"])
def test_another_level_hides_them_too(level, monkeypatch, capfd):
    """1 is what JAX sets where the user did not."""
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", level)
    with quiet_startup():
        os.write(2, KNOWN)
        os.write(2, OTHERS)
    assert capfd.readouterr().err == OTHERS.decode()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == level
