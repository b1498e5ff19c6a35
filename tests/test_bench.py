"""benchmarks/bench.py runs end to end and writes what it says (no timing is
asserted: speed is measured by the benchmark, not by tests)."""

import csv
import importlib.util
import json
import os
from pathlib import Path

import keras
import pytest

from batch_renorm import has_fast_path

ROOT = Path(__file__).resolve().parents[1]
BACKEND = keras.backend.backend()


def load_bench():
    spec = importlib.util.spec_from_file_location(
        "bench", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()
# Batches of 8: renorm-groups4 splits them in two.
TINY = ["--batch-size", "8", "--steps", "1", "--repeats", "2", "--warmup",
        "1", "--depth", "10", "--width", "1", "--channels", "3", "5"]
if BACKEND == "tensorflow":
    # Results go to tensorflow-cpu.json (with XLA: tensorflow-cpu-xla.json,
    # which `auto` picks on a CPU without AVX-512).
    TINY += ["--jit-compile", "off"]


def expected_variants():
    variants = ["batchnorm", "renorm"]
    if has_fast_path():
        variants.append("renorm-portable")
    variants += ["renorm-groups4", "keras-renorm"]
    if BACKEND == "tensorflow" and bench.tf_keras() is not None:
        variants += ["tf.keras-batchnorm", "tf.keras-renorm"]
    return variants


def test_layer_and_model_levels_write_results(tmp_path, capsys):
    results = tmp_path / "results"
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench.README_BEGIN}\nold\n{bench.README_END}"
                      "\nrest\n")
    code = bench.main(TINY + ["--results-dir", str(results),
                              "--readme", str(readme)])
    out = capsys.readouterr().out
    assert code == 0
    variants = expected_variants()
    record = json.loads((results / f"{BACKEND}-cpu.json").read_text())
    assert record["backend"] == BACKEND and record["device_type"] == "cpu"
    assert record["versions"]["keras"] == keras.__version__
    assert record["threads"]["cpu_count"] >= 1
    # The command is main()'s own arguments, not the calling process's.
    assert record["command"].endswith(f"--readme {readme}")
    rows = record["rows"]
    shapes = {"layer": ["8x32x32x3", "8x32x32x5"],
              "model": ["WRN-10-1, 8x32x32x3"]}
    assert [(r["level"], r["shape"], r["variant"]) for r in rows] == [
        (level, shape, variant) for level in ("layer", "model")
        for shape in shapes[level] for variant in variants]
    for row in rows:
        assert row["repeats"] == 2 and row["steps"] == 1
        assert 0 < row["ms_min"] <= row["ms_per_step"] <= row["ms_max"]
        assert row["images_per_s"] == pytest.approx(
            8000 / row["ms_per_step"], rel=1e-2)
        if row["variant"] == "batchnorm":
            assert row["ratio"] == 1.0
        else:
            assert row["ratio"] > 0
    with open(results / f"{BACKEND}-cpu.csv", newline="") as file:
        assert len(list(csv.DictReader(file))) == len(rows)
    summary = (results / "summary.md").read_text()
    assert f"**{BACKEND}**" in summary
    assert summary.count("| layer |") == 2 * len(variants)
    text = readme.read_text()
    assert text.startswith(f"intro\n{bench.README_BEGIN}\n")
    assert text.endswith(f"{bench.README_END}\nrest\n")
    assert "old" not in text and "| model | WRN-10-1" in text
    assert "renorm" in out and "results:" in out

    # A second run of one level keeps the other level's rows.
    assert bench.main(TINY + ["--level", "layer", "--variants", "batchnorm",
                              "renorm", "--channels", "3",
                              "--results-dir", str(results)]) == 0
    rows = json.loads((results / f"{BACKEND}-cpu.json").read_text())["rows"]
    assert [r["level"] for r in rows].count("model") == len(variants)
    assert [r["level"] for r in rows].count("layer") == 2


@pytest.mark.backend_independent
@pytest.mark.parametrize("argv, words", [
    (["--level", "nope"], "invalid choice"),
    (["--steps", "0"], "positive integer"),
    (["--variants", "batchnorm", "--backend", "nope"], "invalid choice"),
    (["--setups", "nope"], "invalid choice"),
    (["--processes", "0"], "positive integer"),
    (["--cpus", "-1"], "integer >= 0"),
    (["--cpus", "100000"], "--cpus 100000: not among this process's CPUs"),
    (["--level", "input", "--processes", "2"], "run the input and loop"),
    (["--level", "loop", "--processes", "2"], "run the input and loop"),
])
def test_bad_arguments_are_one_line(argv, words, tmp_path, capsys):
    assert bench.main(argv + ["--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err


def test_devices_level_needs_jax_and_several_devices(tmp_path, capsys):
    """In this process JAX (if it is the backend) sees one CPU device."""
    assert bench.main(TINY + ["--level", "devices",
                              "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert ("several devices" if BACKEND == "jax" else "jax backend") in err


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's distribution API")
def test_devices_level_on_four_devices(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, KERAS_BACKEND="jax",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), *TINY,
         "--level", "devices", "--results-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "jax-cpu.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == [
        "batchnorm, 1 device", "batchnorm, 4 devices", "renorm, 1 device",
        "renorm, 4 devices", "renorm, 4 devices, per-device statistics"]
    assert [r["ratio"] == 1.0 for r in rows] == [True, False, True, False,
                                                 False]


@pytest.mark.backend_independent
def test_readme_without_the_block_is_an_error(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    readme = tmp_path / "README.md"
    readme.write_text("no block\n")
    assert bench.main(["--summary", "--results-dir", str(results),
                       "--readme", str(readme)]) == 2
    assert "bench.md begins" in capsys.readouterr().err
    assert readme.read_text() == "no block\n"


@pytest.mark.skipif(BACKEND == "torch", reason="torch.compile takes minutes "
                    "on a CPU; measured by the benchmark, not the tests")
def test_jit_level_times_each_norm_with_and_without_xla(tmp_path):
    results = tmp_path / "results"
    assert bench.main(TINY + ["--level", "jit",
                              "--results-dir", str(results)]) == 0
    rows = json.loads((results / f"{BACKEND}-cpu.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == [
        f"{norm}, jit_compile={setting}" for norm in ("batchnorm", "renorm")
        for setting in ("off", "on")]
    for row in rows:
        assert row["level"] == "jit" and row["ms_per_step"] > 0
        assert (row["ratio"] == 1.0) == row["variant"].endswith("off")
    assert "jit_compile=on" in (results / "summary.md").read_text()


def test_matrix_level_covers_every_setup_and_schedule(tmp_path):
    """(Several batch sizes: test_processes_pool_their_rounds_...)"""
    results = tmp_path / "results"
    assert bench.main(TINY + ["--level", "matrix", "--batch-sizes", "4",
                              "--variants", "batchnorm", "renorm",
                              "--results-dir", str(results)]) == 0
    rows = json.loads((results / f"{BACKEND}-cpu.json").read_text())["rows"]
    assert [(r["level"], r["shape"], r["variant"]) for r in rows] == [
        ("matrix", f"4x32x32x3 {setup}", variant)
        for setup in ("input", "input-relu", "scale", "stack4-relu")
        for variant in ("batchnorm", "renorm@ramp", "renorm@fixed")]
    assert {r["ratio"] for r in rows if r["variant"] == "batchnorm"} == {1.0}
    assert "| matrix | 4x32x32x3 stack4-relu | renorm@ramp |" in (
        results / "summary.md").read_text()


@pytest.mark.backend_independent
def test_processes_pool_their_rounds_and_cpus_pin_them(tmp_path, capsys):
    """Orchestration only; also the matrix level's batch sizes in order."""
    results = tmp_path / "results"
    cpus = os.sched_getaffinity(0)
    assert bench.main(TINY + ["--level", "matrix", "--batch-sizes", "4", "8",
                              "--setups", "input",
                              "--variants", "batchnorm", "renorm",
                              "--processes", "2", "--cpus", "0",
                              "--results-dir", str(results)]) == 0
    assert capsys.readouterr().out.count("process 2 of 2") == 1
    # The caller of main() (this test process) keeps its CPUs.
    assert os.sched_getaffinity(0) == cpus
    record = json.loads((results / f"{BACKEND}-cpu.json").read_text())
    assert record["processes"] == 2 and record["threads"]["cpus"] == [0]
    assert "--processes 2" in record["command"]
    assert "--worker-output" not in record["command"]
    rows = record["rows"]
    assert [(r["shape"], r["variant"]) for r in rows] == [
        (f"{b}x32x32x3 input", variant) for b in (4, 8)
        for variant in ("batchnorm", "renorm@ramp", "renorm@fixed")]
    assert {r["repeats"] for r in rows} == {4}  # 2 rounds x 2 processes
    assert "rounds of 2 processes" in (results / "summary.md").read_text()


@pytest.mark.backend_independent
def test_pooled_rows_keep_each_rounds_own_baseline():
    """Ratios of the pooled rounds are per round, not of pooled medians."""
    def run(base, other):
        return bench.rows_of("matrix", "s", {"batchnorm": base, "renorm": other},
                             4, 1, "batchnorm")

    # Process one: renorm 0.9 of batchnorm in each round; process two, on
    # a 10 times faster machine: 1.1. Per-round ratios pool to 1.0; the
    # medians of the pooled times would give 0.505 / 0.55 = 0.92.
    pooled = bench.pooled_rows([run([1.0] * 3, [0.9] * 3),
                                run([0.1] * 3, [0.11] * 3)])
    assert [r["variant"] for r in pooled] == ["batchnorm", "renorm"]
    assert pooled[1]["repeats"] == 6 and pooled[1]["ratio"] == 1.0
    assert pooled[1]["ms_repeats"] == [900.0] * 3 + [110.0] * 3


def test_input_level_measures_the_wait_for_data(tmp_path, data_dir):
    results = tmp_path / "results"
    assert bench.main(TINY + ["--level", "input", "--data-dir", str(data_dir),
                              "--results-dir", str(results)]) == 0
    rows = json.loads((results / f"{BACKEND}-cpu.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == [
        f"{norm}, {pipeline}" for norm in ("batchnorm", "renorm")
        for pipeline in ("resident", "host", "device")]
    for row in rows:
        assert row["level"] == "input" and row["wait_share"] < 1
        # 500 training images in batches of 8: 63 steps per epoch.
        assert row["epoch_s"] == pytest.approx(
            row["ms_per_step"] * 63 / 1000, rel=1e-2)
        assert row["steps_per_execution"] == 1


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow with XLA")
def test_tensorflow_with_xla_has_its_own_results_file(tmp_path):
    results = tmp_path / "results"
    assert bench.main(TINY + ["--level", "layer", "--variants", "batchnorm",
                              "renorm", "--jit-compile", "on",
                              "--results-dir", str(results)]) == 0
    record = json.loads((results / "tensorflow-cpu-xla.json").read_text())
    assert record["jit_compile"] is True
    assert not (results / "tensorflow-cpu.json").exists()
    assert "jit_compile=True" in (results / "summary.md").read_text()



@pytest.mark.skipif(BACKEND == "jax", reason="the loop level runs on JAX")
def test_loop_level_needs_jax(tmp_path, capsys):
    assert bench.main(TINY + ["--level", "loop",
                              "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--backend jax" in err


@pytest.mark.skipif(BACKEND != "jax", reason="train.py's JAX loops")
def test_loop_level_times_both_loops(tmp_path, data_dir):
    """Four WRN-10-1 compilations: about 25 s of CPU."""
    results = tmp_path / "results"
    assert bench.main(TINY + ["--level", "loop", "--data-dir", str(data_dir),
                              "--results-dir", str(results)]) == 0
    rows = json.loads((results / "jax-cpu.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == [
        f"{norm}, {loop}" for norm in ("batchnorm", "renorm")
        for loop in ("per-step", "compiled")]
    for row in rows:
        assert row["level"] == "loop" and row["ms_per_step"] > 0
        # renorm / batchnorm: to the same loop's batchnorm, round by round.
        assert (row["norm_ratio"] == 1.0) == row["variant"].startswith("batch")
    assert "(renorm / batchnorm " in (results / "summary.md").read_text()
