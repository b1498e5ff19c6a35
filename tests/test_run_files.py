"""A run's files against faults: two writers of one run, a damaged
history, a full disk, signals at the end and twice, stale temporaries, and
flags that --resume or the data cannot honour (tiny fake CIFAR-10, WRN-10-1,
on this backend)."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
from experiment import runfiles
from experiment import runlock
from experiment import runtime
from experiment.cli import UsageError
from train_runs import one_error_line
from train_runs import read_history
from train_runs import run_main
from train_runs import run_script
from train_runs import tiny_args
from train_runs import without_timings

pytestmark = pytest.mark.backend_independent

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    """A clean 2-epoch run named `run`, and the same run of 3 epochs
    uninterrupted (the history a resumed run must end with)."""
    out = tmp_path_factory.mktemp("finished")
    args = tiny_args(data_dir, out, "--epochs", "2", "--name", "run",
                     "--val-size", "20")
    assert run_main(args) == 0
    whole = tmp_path_factory.mktemp("whole")
    assert run_main(tiny_args(data_dir, whole, "--epochs", "3", "--name",
                              "run", "--val-size", "20")) == 0
    return out, without_timings(read_history(whole, "run"))


def copy_of(finished, tmp_path):
    out, _ = finished
    for folder in ("history", "weights"):
        shutil.copytree(out / folder, tmp_path / folder)
    return tmp_path


def resume_args(data_dir, out, epochs=3):
    return tiny_args(data_dir, out, "--epochs", str(epochs), "--name", "run",
                     "--val-size", "20", "--resume")


def wait_for(condition, process, seconds=300):
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(0.1)
    return False


def start_long_run(data_dir, out):
    """train.py in a subprocess, 1000 epochs; returns once it has finished
    its first epoch."""
    args = tiny_args(data_dir, out, "--epochs", "1000", "--name", "run",
                     "--val-size", "20")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    csv = out / "history" / "run.csv"
    assert wait_for(lambda: csv.is_file()
                    and len(csv.read_text().splitlines()) > 1, process)
    return process, args


def stop(process):
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    return err


# ------------------------------------------------------------ two writers
def test_a_second_writer_of_a_run_is_refused(data_dir, tmp_path):
    first, args = start_long_run(data_dir, tmp_path)
    try:
        lock = json.loads((tmp_path / "history" / "run.lock").read_text())
        assert lock["pid"] == first.pid
        for second in ("--resume", "--overwrite"):
            line = one_error_line(run_script(*args, second))
            assert f"process {first.pid}" in line and "run.lock" in line
    finally:
        err = stop(first)
    assert first.returncode == 130, err
    epochs = [int(r["epoch"]) for r in read_history(tmp_path, "run")]
    assert epochs == list(range(1, len(epochs) + 1))
    assert not (tmp_path / "history" / "run.lock").exists()  # released


def test_a_stale_lock_is_reported_and_taken_over(finished, data_dir,
                                                 tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    gone = subprocess.run([sys.executable, "-c",
                           "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=False)
    lock = out / "history" / "run.lock"
    lock.write_text(json.dumps({"pid": int(gone.stdout),
                                "host": socket.gethostname()}))
    assert run_main(resume_args(data_dir, out)) == 0
    assert "removing the stale lock" in capsys.readouterr().err
    assert not lock.exists()
    assert without_timings(read_history(out, "run")) == finished[1]


@pytest.mark.parametrize("age, holder, words", [
    (0, "", "is being started by another process"),
    (60, "", None),
    (0, {"pid": 1, "host": "elsewhere", "since": "then"},
     "is being written by process 1 on elsewhere since then"),
])
def test_an_empty_lock_or_one_of_another_host(tmp_path, age, holder, words):
    """An empty lock is a process starting, or one killed as it started it
    (taken over once older than EMPTY_LOCK_SECONDS); a holder on another
    host cannot be checked, so it is taken as alive."""
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps(holder) if holder else "")
    then = time.time() - age
    os.utime(lock, (then, then))
    notes = []
    taking = runlock.run_lock(lock, "run", "train.py", notes.append)
    if words:
        with pytest.raises(UsageError, match=words), taking:
            pass
        assert lock.exists() and not notes
        return
    with taking:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert notes == [
        f"removing the empty lock {lock} (left by a killed process)"]
    assert not lock.exists()


# ---------------------------------------------------------- damaged CSV
def cut_last_row(text):
    lines = text.splitlines(keepends=True)
    return "".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2]


def duplicate_last_row(text):
    return text + text.splitlines(keepends=True)[-1]


@pytest.mark.parametrize("damage, words", [
    (cut_last_row, "held epochs 1,2 (1 of its rows incomplete)"),
    (duplicate_last_row, "held epochs 1,2,2"),
    (lambda text: text + "garbage\n", "held epochs 1,2,garbage"),
    (lambda text: text + "3,1,1,1,1,1,1,1,1,1\n", "held epochs 1,2,3"),
    (lambda text: text + ",1,1\n",
     "held epochs 1,2 and 1 row(s) without an epoch"),
    (None, "was missing"),
])
def test_resume_rewrites_a_damaged_history_from_the_state(
        finished, data_dir, tmp_path, capsys, damage, words):
    out = copy_of(finished, tmp_path)
    csv = out / "history" / "run.csv"
    if damage is None:
        csv.unlink()
    else:
        csv.write_text(damage(csv.read_text()))
    assert run_main(resume_args(data_dir, out)) == 0
    err = capsys.readouterr().err
    assert f"repaired {csv} from the saved state: it {words}" in err
    assert "it now holds epochs 1-2" in err
    assert without_timings(read_history(out, "run")) == finished[1]


def test_an_unreadable_history_is_moved_aside(finished, data_dir, tmp_path,
                                              capsys):
    out = copy_of(finished, tmp_path)
    csv = out / "history" / "run.csv"
    damaged = csv.read_bytes() + b"\xff\xfe3,\x00\n"
    csv.write_bytes(damaged)
    assert run_main(resume_args(data_dir, out)) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    aside = csv.with_name("run.csv.unreadable")
    assert f"moved the unreadable {csv}" in err and str(aside) in err
    assert aside.read_bytes() == damaged  # nothing the user had is lost
    assert without_timings(read_history(out, "run")) == finished[1]


def test_an_undamaged_history_resumes_without_a_note(finished, data_dir,
                                                     tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    assert run_main(resume_args(data_dir, out)) == 0
    assert "repaired" not in capsys.readouterr().err


# -------------------------------------------------------------- full disk
def raise_enospc_on_the_third_weights_write(monkeypatch):
    """fsync raises ENOSPC for the third .weights.h5 written (epoch 1
    writes the best and the last weights; epoch 2's first one fails)."""
    real_fsync, written = os.fsync, []

    def fsync(fd):
        if ".weights.h5" in os.readlink(f"/proc/self/fd/{fd}"):
            written.append(fd)
            if len(written) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(runfiles.os, "fsync", fsync)


def test_a_full_disk_is_one_line_and_resumable(data_dir, tmp_path,
                                               monkeypatch, capsys, finished):
    args = tiny_args(data_dir, tmp_path, "--epochs", "3", "--name", "run",
                     "--val-size", "20")
    raise_enospc_on_the_third_weights_write(monkeypatch)
    assert run_main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines()
           if "warning:" not in line]  # the schedule's, at start-up
    assert len(err) == 1 and err[0].startswith("train.py: error: cannot write")
    assert ".weights.h5: not enough free space" in err[0]
    assert "MB needed" in err[0] and "MB free" in err[0]
    weights = tmp_path / "weights"
    assert not list(weights.glob(".*tmp*"))
    # The files of epoch 1 are whole (they load); --resume goes on.

    from experiment import network

    config, _, _ = train.parse_args(args)
    model = network.build_model(config)
    model.load_weights(weights / "run.weights.h5")
    monkeypatch.undo()
    assert run_main(args + ["--resume"]) == 0
    assert without_timings(read_history(tmp_path, "run")) == finished[1]


def test_a_disk_without_room_is_refused_before_writing(tmp_path, monkeypatch):
    path = tmp_path / "run.state.npz"
    path.write_bytes(b"old")
    monkeypatch.setattr(runfiles.shutil, "disk_usage",
                        lambda _: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(runfiles.WriteError, match=(
            r"cannot write .*run.state.npz: not enough free space \(0.01 MB "
            r"needed, 0.00 MB free")):
        runfiles.write_file(path, b"x" * 10_000)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.state.npz"]


def small_tmpfs(path, size):
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}",
                             "tmpfs", str(path)], capture_output=True,
                            check=False)
    if result.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    return path


def test_a_real_full_disk(finished, data_dir, tmp_path):
    """The weights folder on a tmpfs that holds epoch 1's files but not the
    next state beside them: one line, exit 1, no crash, epoch 1 intact."""
    out, _ = finished
    used = sum(p.stat().st_size for p in (out / "weights").iterdir())
    state = (out / "weights" / "run.state.npz").stat().st_size
    weights = small_tmpfs(tmp_path / "weights", used + state // 2)
    try:
        args = ["--norm", "renorm", "--data-dir", str(data_dir),
                "--history-dir", str(tmp_path / "history"),
                "--weights-dir", str(weights), "--depth", "10", "--width",
                "1", "--train-size", "100", "--batch-size", "50",
                "--epochs", "3", "--name", "run", "--val-size", "20"]
        result = run_script(*args)
        assert result.returncode == 1, result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("train.py: error: cannot write ")
        assert "not enough free space" in line
        assert "Traceback" not in result.stderr
        assert "Exception ignored" not in result.stderr
        assert [r["epoch"] for r in read_history(tmp_path, "run")] == ["1"]
    finally:
        subprocess.run(["umount", str(weights)], check=False)


# ---------------------------------------------------------------- signals
def test_sigterm_in_the_test_evaluation(finished, data_dir, tmp_path,
                                        monkeypatch, capsys):
    out = copy_of(finished, tmp_path)
    record = json.loads((out / "history" / "run.json").read_text())
    del record["result"]
    (out / "history" / "run.json").write_text(json.dumps(record))
    original = train.test_accuracy

    def terminated(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        return original(*args)

    monkeypatch.setattr(train, "test_accuracy", terminated)
    args = resume_args(data_dir, out, epochs=2)
    assert run_main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "during the test evaluation" in err
    assert "all 2 epochs are saved" in err and "--resume" in err
    assert "before training began" not in err
    monkeypatch.undo()
    assert run_main(args) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert "result" in json.loads((out / "history" / "run.json").read_text())


def test_a_second_ctrl_c_lets_the_shutdown_finish(data_dir, tmp_path):
    """A second SIGINT once the first one's message is out (the process
    closing down) changes nothing: exit 130, one message, no traceback."""
    process, _ = start_long_run(data_dir, tmp_path)
    lines = []
    try:
        process.send_signal(signal.SIGINT)
        for line in process.stderr:
            lines.append(line)
            if "interrupted" in line:
                process.send_signal(signal.SIGINT)
                break
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    err = "".join(lines) + err
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "interrupted" in line]) == 1
    assert "--resume" in err


def test_an_interruption_that_some_code_swallowed_still_stops_the_run(
        data_dir, tmp_path, monkeypatch, capsys):
    """The handler's exception raised inside code that catches everything
    (a finalizer, a callback from C: seen under JAX and TensorFlow, where
    the run went on training with later signals ignored): the next batch
    raises it again."""
    original = runtime.epoch_clock

    def swallowing_clock(*args):
        clock = original(*args)
        begin = clock.on_epoch_begin
        epochs = []

        def on_epoch_begin(epoch, logs=None):  # a fit per epoch: epoch 0
            begin(epoch, logs)
            epochs.append(epoch)
            if len(epochs) == 2:
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(1)
                except BaseException:
                    pass

        clock.on_epoch_begin = on_epoch_begin
        return clock

    monkeypatch.setattr(runtime, "epoch_clock", swallowing_clock)
    args = tiny_args(data_dir, tmp_path, "--epochs", "3", "--name", "run")
    assert run_main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted (SIGINT) in epoch 2 of 3; epochs 1-1 are saved" in err
    assert [r["epoch"] for r in read_history(tmp_path, "run")] == ["1"]


STUCK_IN_C = """
import ctypes, sys
import train
from experiment import signals

signals.STUCK_SECONDS = 1.0
mutex = ctypes.create_string_buffer(64)  # PTHREAD_MUTEX_INITIALIZER: zeros


def deadlock(*args):  # a framework call that never returns, signals or not
    print("stuck", file=sys.stderr, flush=True)
    libc = ctypes.CDLL(None)
    libc.pthread_mutex_lock(mutex)
    libc.pthread_mutex_lock(mutex)


train.train = deadlock
sys.exit(train.main(sys.argv[1:], exiting=True))
"""


def test_a_signal_that_the_main_thread_never_takes_ends_the_run(data_dir,
                                                                tmp_path):
    """The main thread stuck in C: Python never runs the handler, so the
    watchdog ends the process with the signal's exit code and a line that
    says how to go on."""
    args = tiny_args(data_dir, tmp_path, "--name", "run")
    process = subprocess.Popen(
        [sys.executable, "-c", STUCK_IN_C, *args], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr.readline() == "stuck\n"
        time.sleep(0.5)  # inside the second lock
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "train.py: interrupted (SIGTERM), but the framework did not hand "
        "control back within 1 s, so the process ends now"), err
    assert last.endswith("--name run --resume")


# ------------------------------------------------------------ temporaries
def test_stale_temporaries_are_removed(finished, data_dir, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    stale = [out / "weights" / ".run.weights.h5.99999.tmp.weights.h5",
             out / "weights" / ".run.state.npz.99999.tmp.npz",
             out / "history" / ".run.csv.99999.tmp.csv"]
    other = out / "weights" / ".run2.weights.h5.99999.tmp.weights.h5"
    for path in stale + [other]:
        path.write_bytes(b"partial")
    assert run_main(resume_args(data_dir, out)) == 0
    assert "removed 3 temporary file(s)" in capsys.readouterr().err
    assert not any(path.exists() for path in stale)
    assert other.exists()  # another run's


# ------------------------------------------------ what cannot be honoured
def test_epochs_may_only_grow_on_resume(finished, data_dir, tmp_path,
                                        capsys):
    out = copy_of(finished, tmp_path)
    assert run_main(resume_args(data_dir, out, epochs=1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--epochs 1 is fewer than the 2 epochs" in err[0]
    assert json.loads((out / "history" / "run.json").read_text())[
        "epochs"] == 2
    # Without --epochs, --resume keeps the run's own (not the protocol's 100).
    args = tiny_args(data_dir, out, "--name", "run", "--val-size", "20",
                     "--resume")
    del args[args.index("--epochs"):args.index("--epochs") + 2]
    assert run_main(args) == 0
    assert "after epoch 2 of 2" in capsys.readouterr().out


def test_a_batch_larger_than_the_training_set_is_refused(data_dir, tmp_path):
    line = one_error_line(run_script(*tiny_args(
        data_dir, tmp_path, "--train-size", "5", "--batch-size", "128")))
    assert "--batch-size 128 is more than the 5 training images" in line
