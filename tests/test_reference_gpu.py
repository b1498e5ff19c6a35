"""benchmarks/reference_gpu.py, the GPU reproduction's one command, in its
tiny mode on the CPU (JAX): the same flags, files, plots and time budget as
on the GPU, so that a GPU run cannot fail for a reason a CPU would have
caught. The job runs in its own processes, always on JAX: the tests run
once, whatever the backend of the test process."""

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from fake_cifar import write_fake_cifar

from experiment import runfiles

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "reference_gpu.py"
RUNS = ("batchnorm-seed-s0", "renorm-seed-s0")
pytestmark = pytest.mark.backend_independent


def job(*args, backend="jax"):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT,
                          env=dict(os.environ, KERAS_BACKEND=backend),
                          capture_output=True, text=True, timeout=900,
                          check=False)


def folders(tmp_path):
    return ["--history-dir", str(tmp_path / "h"),
            "--weights-dir", str(tmp_path / "w"),
            "--plots-dir", str(tmp_path / "p"),
            "--results-dir", str(tmp_path / "r")]


def skipped(stdout):
    """The steps that the job's lines say it skipped, with their lines."""
    return {m.group(1): line for line in stdout.splitlines()
            if (m := re.match(r"reference_gpu\.py: skipped (\S+): ", line))}


def tar_members(path):
    """{name inside: bytes} of an archive."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def table_row(summary, step):
    """The cells of `step`'s row in a summary.md table."""
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == step:
            return cells
    raise AssertionError(f"no row for {step} in:\n{summary}")


def mean_seconds_after_first(path):
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    later = [float(r["seconds"]) for r in rows if r["epoch"] != "1"]
    return len(rows), sum(later) / len(later)


def check_run_archives(out, name, tmp_path):
    """NAME.tar holds the run's history and last weights, NAME.best.tar its
    best weights, byte for byte, at the repository's paths."""
    history, weights = tmp_path / "h" / "gpu-cpu", tmp_path / "w" / "gpu-cpu"
    expected = {
        f"history/gpu-cpu/{name}.csv": (history / f"{name}.csv").read_bytes(),
        f"history/gpu-cpu/{name}.json":
            (history / f"{name}.json").read_bytes(),
        f"weights/gpu-cpu/{name}.weights.h5":
            (weights / f"{name}.weights.h5").read_bytes()}
    if name.startswith("renorm"):  # what r and d did, per epoch and layer
        expected[f"history/gpu-cpu/{name}.corrections.csv"] = (
            history / f"{name}.corrections.csv").read_bytes()
    assert tar_members(out / f"{name}.tar") == expected
    assert tar_members(out / f"{name}.best.tar") == {
        f"weights/gpu-cpu/{name}.best.weights.h5":
            (weights / f"{name}.best.weights.h5").read_bytes()}


def test_the_tiny_job_within_a_budget(tmp_path):
    data = write_fake_cifar(tmp_path / "data", per_class=10,
                            test_per_class=20)
    out = ["--data-dir", str(data), *folders(tmp_path)]
    history = tmp_path / "h" / "gpu-cpu"

    # A budget that the first run (the measurement, which always runs)
    # spends: the other steps are skipped, each named with its estimate.
    tight = tmp_path / "tight"
    result = job("--tiny", "--time-budget", "1", "--output-dir", str(tight),
                 *out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "device cpu" in result.stdout
    lines = skipped(result.stdout)
    assert sorted(lines) == ["bench", "renorm-seed-s0"], result.stdout
    for line in lines.values():
        assert re.search(r"needs about \d+ s \(.+\), 0 s of the budget left$",
                         line), line
    assert "x1.35 for a norm not measured yet" in lines["renorm-seed-s0"]
    assert not (history / "renorm-seed-s0.csv").exists()  # never started
    assert sorted(p.name for p in tight.iterdir()) == [
        "batchnorm-seed-s0.best.tar", "batchnorm-seed-s0.tar", "reports.tar",
        "summary.md"]
    check_run_archives(tight, "batchnorm-seed-s0", tmp_path)
    summary = (tight / "summary.md").read_text()
    epochs, seconds = mean_seconds_after_first(history /
                                               "batchnorm-seed-s0.csv")
    assert table_row(summary, "batchnorm-seed-s0")[1:4] == [
        "finished", f"{epochs}/{epochs}", f"{seconds:.3f}"]
    assert table_row(summary, "renorm-seed-s0")[1] == "skipped"
    assert all(line.split(": ", 1)[1] in summary for line in lines.values())
    row = next(line for line in summary.splitlines()
               if line.startswith("| batchnorm-seed-s0 "))
    assert row in result.stdout.splitlines()  # the table, printed at the end

    # A budget that lets everything through: the finished run is kept (and
    # copied again), the rest runs.
    ample = tmp_path / "ample"
    result = job("--tiny", "--time-budget", "3600", "--output-dir",
                 str(ample), *out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batchnorm-seed-s0: finished, kept" in result.stdout
    assert skipped(result.stdout) == {}
    for name in RUNS:
        record = json.loads((history / f"{name}.json").read_text())
        assert (record["precision"], record["input"], record["val_from"],
                record["protocol"], record["steps_per_execution"]) == (
                    "mixed_bfloat16", "device", "test", "seed", 4)
        assert "result" in record
        check_run_archives(ample, name, tmp_path)
    plots = sorted(p.name for p in (tmp_path / "p" / "gpu-cpu").iterdir())
    assert plots == sorted(["curves.png", "seconds_per_epoch.png",
                            "timing.md", "renorm-seed-s0.corrections.png"])
    bench = json.loads((tmp_path / "r" / "gpu-cpu" / "jax-cpu.json")
                       .read_text())
    assert {row["variant"] for row in bench["rows"]} >= {"batchnorm",
                                                         "renorm"}
    files = sorted(p.name for p in ample.iterdir())
    assert files == sorted([f"{n}{s}.tar" for n in RUNS
                            for s in ("", ".best")]
                           + ["reports.tar", "summary.md"])
    reports = tar_members(ample / "reports.tar")
    assert {f"plots/gpu-cpu/{p}" for p in plots} | {
        "benchmarks/results/gpu-cpu/jax-cpu.json"} <= set(reports)
    summary = (ample / "summary.md").read_text()
    assert reports["plots/gpu-cpu/reference_gpu.md"].decode() == summary
    assert [table_row(summary, step)[1] for step in (*RUNS, "bench")] == [
        "kept", "finished", "finished"]


def write_finished_run(history, name, losses):
    """A run's CSV and JSON as train.py leaves a finished run, one epoch
    per (loss, val_loss) of `losses`."""
    history.mkdir(parents=True, exist_ok=True)
    rows = [{"epoch": epoch, "seconds": "1.0", "eval_seconds": "0.1",
             "loss": loss, "accuracy": "0.1", "val_loss": val_loss,
             "val_accuracy": "0.1", "lr": "0.001"}
            for epoch, (loss, val_loss) in enumerate(losses, 1)]
    runfiles.write_rows(history / f"{name}.csv",
                        runfiles.columns({"norm": "batchnorm"}), rows)
    runfiles.write_json(history / f"{name}.json", {
        "norm": "batchnorm", "epochs": len(rows),
        "result": {"test_accuracy": 0.1, "best_test_accuracy": 0.1}})


def test_a_loss_that_is_not_finite_fails_the_job(tmp_path):
    # A finished run whose last epoch's val_loss is not finite (as mixed
    # bfloat16 evaluation once gave on CPU JAX): the job fails on it, in
    # one line, and starts nothing after it. (The training loss and an
    # infinity: test_finite_losses_pass_the_check.)
    losses = [("2.3", "2.4"), ("2.1", "nan")]
    history = tmp_path / "h" / "gpu-cpu"
    write_finished_run(history, "batchnorm-seed-s0", losses)
    out = tmp_path / "out"
    result = job("--tiny", "--epochs", "2", "--output-dir", str(out),
                 *folders(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    line = one_error_line(result)
    assert "batchnorm-seed-s0: val_loss is 'nan' in epoch 2" in line
    assert "finished, kept" in result.stdout
    assert "python train.py" not in result.stdout  # nothing started
    assert not (history / "renorm-seed-s0.csv").exists()
    summary = (out / "summary.md").read_text()
    assert table_row(summary, "batchnorm-seed-s0")[1] == "not finite"


def load_module():
    spec = importlib.util.spec_from_file_location("reference_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finite_losses_pass_the_check(tmp_path):
    module = load_module()
    history = tmp_path / "h"
    write_finished_run(history, "run", [("2.3", "2.4"), ("1e-08", "3e+02")])
    step = module.Step("train.py", [], "run", "batchnorm", 2)
    place = module.Folders(history, tmp_path / "w", tmp_path / "p",
                           tmp_path / "r")
    assert module.not_finite(step, place) is None
    write_finished_run(history, "run", [("2.3", "2.4"), ("-inf", "3")])
    assert "run: loss is '-inf' in epoch 2" in module.not_finite(step, place)


# Stands for train.py (and bench.py) in the budget test: a CSV row every
# 0.2 s until a signal ends it.
STEADY_RUN = """import sys, time
with open(sys.argv[1], "w") as file:
    file.write("epoch,seconds\\n")
for epoch in range(1, 250):
    time.sleep(0.2)
    with open(sys.argv[1], "a") as file:
        file.write(f"{epoch},0.2\\n")
"""


def test_the_budget_stops_a_run_and_the_bench(tmp_path):
    module = load_module()
    script = tmp_path / "steady_run.py"
    script.write_text(STEADY_RUN)
    history = tmp_path / "h"
    history.mkdir()
    place = module.Folders(history, tmp_path / "w", tmp_path / "p",
                           tmp_path / "r")

    def train(name, budget, trained):
        job = module.Job(place, "cpu", budget)
        job.trained = trained
        step = module.Step(str(script), [str(history / f"{name}.csv")], name,
                           "batchnorm", 200)
        job.plot = lambda: 0  # plot.py: not of this test
        assert job.run_step(step) == ("plot.py", 0)
        assert step.status.startswith("stopped after epoch ")
        assert step.wall < 30 and len(job.notes) == 1
        return job, step, job.notes[0].removeprefix(f"stopped {name}: ")

    # The first run (the probe) runs its PROBE_EPOCHS; then its own pace
    # projects its end past the budget: stopped, and its pace noted.
    job, step, why = train("probe", 40, 0)
    assert re.fullmatch(r"its \d+ epochs to go need about \d+ s \(0\.\d\d s "
                        r"an epoch\), \d+ s of the budget left; the same "
                        "command continues it", why), why
    assert module.rows_done(step, place) >= module.PROBE_EPOCHS
    assert 0.1 < job.costs["batchnorm"].epoch < 1
    # A later run, once the budget is spent: stopped at the first look.
    job, step, why = train("later", 1e-3, 1)
    assert re.fullmatch(r"the budget is spent, \d of 200 epochs done; the "
                        "same command continues it", why), why
    # The bench likewise, and that is no failure.
    job = module.Job(place, "cpu", 1e-3)
    bench = module.Step(str(script), [str(tmp_path / "bench.csv")], "bench")
    assert job.run_step(bench) == (str(script), 0)
    assert bench.status == "stopped"
    assert job.notes == ["stopped bench: the budget is spent"]


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("reference_gpu.py: error: ")
    return lines[0]


def test_it_needs_jax(tmp_path):
    result = job(backend="torch")
    assert result.returncode == 1
    assert "this job runs on jax" in one_error_line(result)


def test_without_a_gpu_it_says_how_to_get_one():
    import jax

    if jax.devices()[0].platform == "gpu":
        pytest.skip("a GPU is here")
    result = job()
    assert result.returncode == 1
    line = one_error_line(result)
    assert "JAX sees no GPU" in line and "jax[cuda" in line


@pytest.mark.parametrize("flags, message", [
    (["--norms", "keras-renorm"], "invalid choice"),
    (["--time-budget", "0"], "must be a positive number: 0"),
    (["--time-budget", "-5"], "must be a positive number: -5"),
    (["--time-budget", "nan"], "must be a positive number: nan"),
    (["--time-budget", "soon"], "invalid positive_float value: 'soon'"),
])
def test_bad_flags(flags, message):
    result = job(*flags)
    assert result.returncode == 2
    assert message in one_error_line(result)


def test_an_output_folder_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = job("--output-dir", str(blocker / "out"))
    assert result.returncode == 2
    assert "cannot write to the output folder" in one_error_line(result)
