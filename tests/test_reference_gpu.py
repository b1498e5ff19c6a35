"""benchmarks/reference_gpu.py, the GPU reproduction's one command, in its
tiny mode on the CPU (JAX): the same flags, files and plots as on the GPU,
so that a GPU run cannot fail for a reason a CPU would have caught."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from fake_cifar import write_fake_cifar

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "reference_gpu.py"


def job(*args, backend="jax"):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT,
                          env=dict(os.environ, KERAS_BACKEND=backend),
                          capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(keras.backend.backend() != "jax",
                    reason="the job runs on JAX; tested once, on that pass")
def test_the_tiny_job_end_to_end(tmp_path):
    data = write_fake_cifar(tmp_path / "data", per_class=10,
                            test_per_class=20)
    out = ["--data-dir", str(data), "--history-dir", str(tmp_path / "h"),
           "--weights-dir", str(tmp_path / "w"),
           "--plots-dir", str(tmp_path / "p"), "--results-dir",
           str(tmp_path / "r")]
    result = job("--tiny", *out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "device cpu" in result.stdout
    history = tmp_path / "h" / "gpu-cpu"
    for norm in ("batchnorm", "renorm"):
        name = f"{norm}-seed-s0"
        record = json.loads((history / f"{name}.json").read_text())
        assert (record["precision"], record["input"], record["val_from"],
                record["protocol"]) == ("mixed_bfloat16", "device", "test",
                                        "seed")
        assert "result" in record
        with open(history / f"{name}.csv", newline="") as file:
            assert [r["epoch"] for r in csv.DictReader(file)] == ["1"]
    plots = sorted(p.name for p in (tmp_path / "p" / "gpu-cpu").iterdir())
    assert plots == ["curves.png", "seconds_per_epoch.png", "timing.md"]
    bench = json.loads((tmp_path / "r" / "gpu-cpu" / "jax-cpu.json")
                       .read_text())
    assert {row["variant"] for row in bench["rows"]} >= {"batchnorm",
                                                         "renorm"}
    # Again: the finished runs are kept, not trained again.
    again = job("--tiny", "--norms", "renorm", *out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "renorm-seed-s0: finished, kept" in again.stdout


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("reference_gpu.py: error: ")
    return lines[0]


def test_it_needs_jax(tmp_path):
    result = job(backend="torch")
    assert result.returncode == 1
    assert "this job runs on jax" in one_error_line(result)


@pytest.mark.skipif(keras.backend.backend() != "jax",
                    reason="the job runs on JAX; tested once, on that pass")
def test_without_a_gpu_it_says_how_to_get_one():
    import jax

    if jax.devices()[0].platform == "gpu":
        pytest.skip("a GPU is here")
    result = job()
    assert result.returncode == 1
    line = one_error_line(result)
    assert "JAX sees no GPU" in line and "jax[cuda12]" in line


def test_bad_flags(tmp_path):
    result = job("--norms", "keras-renorm")
    assert result.returncode == 2
    assert "invalid choice" in one_error_line(result)
