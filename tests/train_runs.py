"""Tiny runs of train.py for the tests: their flags, running it in this
process or in a subprocess, and reading what it wrote."""

import csv
import subprocess
import sys
from pathlib import Path

import train

ROOT = Path(__file__).resolve().parent.parent
TIMINGS = ("seconds", "eval_seconds")


def tiny_args(data_dir, out, *extra, norm="renorm"):
    """Flags of a tiny run: WRN-10-1, 100 images in batches of 50."""
    return ["--norm", norm, "--data-dir", str(data_dir),
            "--history-dir", str(out / "history"),
            "--weights-dir", str(out / "weights"),
            "--depth", "10", "--width", "1", "--train-size", "100",
            "--batch-size", "50", "--epochs", "1", *extra]


def run_main(args):
    """Runs train.py in this process (no second Keras import)."""
    return train.main(args)


def read_history(out, name):
    with open(out / "history" / f"{name}.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    return rows


def without_timings(rows):
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def run_script(*args, **kwargs):
    """Runs `python train.py ARGS` in a subprocess."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
        capture_output=True, text=True, timeout=600, check=False, **kwargs)


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("train.py: error: ")
    return lines[0]
