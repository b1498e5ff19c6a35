"""Tests of plot.py on small fake histories (no Keras involved)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest

import plot
from experiment import curves_study
from experiment import histories
from experiment import microbatch_study
from experiment import sweep_study
from experiment.protocols import PROTOCOLS, RUN_DEFAULTS

pytestmark = pytest.mark.backend_independent

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEADER = "epoch,seconds,eval_seconds,loss,accuracy,val_loss,val_accuracy,lr"
# What train.py records of the code a run ran (clean: no warning).
PROVENANCE = {"commit": "ab" * 20, "dirty": False, "version": "0.1.0"}


def full_config(**changes):
    """A complete configuration as train.py writes it (protocol seed)."""
    config = {**dataclasses.asdict(PROTOCOLS["seed"]), **RUN_DEFAULTS,
              "norm": "renorm", "protocol": "seed", "name": "a",
              "backend": "tensorflow", "device": "CPU"}
    config["lr_milestones"] = list(config["lr_milestones"])
    return {**config, **changes}


def write_run(history, name, norm, seconds, val_accuracy, seed=0,
              batch_size=128, **config):
    """Writes history/<name>.csv and .json as train.py does (validated on
    the test images); returns the per-epoch seconds and validation
    accuracies written."""
    history.mkdir(exist_ok=True)
    config = full_config(**{
        "norm": norm, "name": name, "batch_size": batch_size,
        "epochs": len(seconds), "lr": 0.1, "seed": seed, "train_size": 50000,
        "augment": True, "val_from": "test", "backend": "jax", "device": "cpu",
        "versions": {"keras": "3.15.1"}, "provenance": PROVENANCE, **config})
    (history / f"{name}.json").write_text(json.dumps(config))
    lines = [HEADER + (",r_max,d_max" if norm == "renorm" else "")]
    for epoch, (sec, acc) in enumerate(zip(seconds, val_accuracy), start=1):
        loss = 2.0 / epoch
        line = (f"{epoch},{sec!r},0.5,{loss!r},{acc + 0.05!r},{loss + 0.1!r},"
                f"{acc!r},0.1")
        lines.append(line + (",1.5,0.5" if norm == "renorm" else ""))
    (history / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return seconds, val_accuracy


@pytest.fixture
def two_norms(tmp_path):
    """batchnorm with two seeds, renorm with one; returns the data."""
    history = tmp_path / "history"
    return history, {
        "bn0": write_run(history, "bn0", "batchnorm",
                         [9.0, 2.0, 2.2, 2.1], [0.30, 0.50, 0.62, 0.60]),
        "bn1": write_run(history, "bn1", "batchnorm", [8.0, 2.4, 2.3, 2.5],
                         [0.35, 0.55, 0.58, 0.61], seed=1),
        "brn0": write_run(history, "brn0", "renorm", [10.0, 3.0, 3.3, 3.1],
                          [0.32, 0.52, 0.64, 0.63]),
    }


def run_main(argv, capsys):
    code = plot.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def table(text):
    """The rows of the (first) Markdown table in timing.md, by group label."""
    first = text.split("\n| ", 1)[1].split("\n\n", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in ("| " + first).splitlines() if line.startswith("| ")]
    header = rows[0]
    return {row[0]: dict(zip(header, row)) for row in rows[1:]}


def percent(values):
    values = np.asarray(values) * 100
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_command_line_writes_figures_and_table(two_norms, tmp_path):
    history, _ = two_norms
    plots = tmp_path / "out" / "plots"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "plot.py"),
         "--history-dir", str(history), "--plots-dir", str(plots)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        check=False)
    assert result.returncode == 0, result.stderr
    imports = [line.split("|")[-1].strip()
               for line in result.stderr.splitlines()
               if line.startswith("import time:")]
    assert "matplotlib" in imports
    assert not [name for name in imports if name.startswith("keras")]
    assert len(imports) == len(result.stderr.splitlines())  # no warnings
    assert_png(plots / "curves.png")
    assert_png(plots / "seconds_per_epoch.png")
    timing = (plots / "timing.md").read_text()
    assert result.stdout == timing
    assert f"3 run(s) from `{history}`" in timing
    assert sorted(p.name for p in plots.iterdir()) == [
        "curves.png", "seconds_per_epoch.png", "timing.md"]  # no temp files


def test_timing_table_values(two_norms, tmp_path, capsys):
    history, data = two_norms
    plots = tmp_path / "plots"
    code, _out, err = run_main(
        ["--history-dir", history, "--plots-dir", plots], capsys)
    assert code == 0 and err == ""
    rows = table((plots / "timing.md").read_text())
    assert list(rows) == ["batchnorm", "renorm"]  # seed does not split
    bn_median = np.median(data["bn0"][0] + data["bn1"][0])
    brn_median = np.median(data["brn0"][0])
    bn, brn = rows["batchnorm"], rows["renorm"]
    assert (bn["runs"], brn["runs"]) == ("2", "1")
    assert (bn["epochs"], brn["epochs"]) == ("4", "4")
    assert bn["median s/epoch"] == f"{bn_median:.2f}"
    assert brn["median s/epoch"] == f"{brn_median:.2f}"
    assert bn["ratio to batchnorm"] == "1.00"
    assert brn["ratio to batchnorm"] == f"{brn_median / bn_median:.2f}"
    bn_acc = [data["bn0"][1], data["bn1"][1]]
    assert bn["best val acc (%)"] == percent([max(a) for a in bn_acc])
    assert bn["final val acc (%)"] == percent([a[-1] for a in bn_acc])
    assert brn["best val acc (%)"] == percent([max(data["brn0"][1])])
    assert brn["final val acc (%)"] == percent([data["brn0"][1][-1]])
    assert (brn["device"], brn["backend"]) == ("cpu", "jax")


def test_batch_sizes_split_groups_and_pair_ratios(tmp_path, capsys):
    history = tmp_path / "history"
    seconds = {("batchnorm", 32): [4.0, 4.0, 5.0],
               ("batchnorm", 128): [1.0, 2.0, 2.0],
               ("renorm", 32): [6.0, 7.0, 6.0],
               ("renorm", 128): [3.0, 3.0, 3.0],
               ("renorm", 64): [2.0, 2.0, 2.0]}
    for (norm, batch_size), secs in seconds.items():
        write_run(history, f"{norm}{batch_size}", norm, secs,
                  [0.5, 0.6, 0.7], batch_size=batch_size)
    code, out, err = run_main(
        ["--history-dir", history, "--plots-dir", tmp_path / "plots"], capsys)
    assert code == 0 and err == ""
    rows = table(out)
    assert list(rows) == [
        "batchnorm, batch_size=32", "batchnorm, batch_size=128",
        "renorm, batch_size=32", "renorm, batch_size=64",
        "renorm, batch_size=128"]
    for batch_size in (32, 128):
        ratio = (np.median(seconds[("renorm", batch_size)])
                 / np.median(seconds[("batchnorm", batch_size)]))
        row = rows[f"renorm, batch_size={batch_size}"]
        assert row["ratio to batchnorm"] == f"{ratio:.2f}"
    assert rows["renorm, batch_size=64"]["ratio to batchnorm"] == "n/a"
    assert_png(tmp_path / "plots" / "curves.png")


BAD_HISTORIES = {
    "no_json": None,
    "empty_csv": "",
    "no_val_columns": "epoch,seconds,loss,accuracy\n1,2.0,1.0,0.5\n",
    "non_numeric": f"{HEADER}\n1,2.0,0.5,1.0,0.5,1.1,0.4,0.1\n"
                   f"2,fast,0.5,1.0,0.5,1.1,0.4,0.1\n"
                   f"3,2.0,0.5,1.0,0.5,1.1,0.4,0.1\n",
    "extra_field": f"{HEADER}\n1,2.0,0.5,1.0,0.5,1.1,0.4,0.1,9,9\n",
    "header_only": f"{HEADER}\n",
}


def test_malformed_histories_are_skipped_and_named(two_norms, tmp_path,
                                                   capsys):
    history, _ = two_norms
    for name, text in BAD_HISTORIES.items():
        write_run(history, name, "renorm", [1.0], [0.5])
        if text is None:
            (history / f"{name}.json").unlink()
        else:
            (history / f"{name}.csv").write_text(text)
    (history / "bad_json.csv").write_text((history / "bn0.csv").read_text())
    (history / "bad_json.json").write_text("{not json")
    (history / "only_json.json").write_text('{"norm": "renorm"}')
    # A run still writing its last line: that row is dropped, the run kept.
    write_run(history, "partial", "keras-renorm", [5.0, 6.0], [0.4, 0.5],
              epochs=4)
    with open(history / "partial.csv", "a") as csv:
        csv.write("3,7.0,0.5")
    plots = tmp_path / "plots"
    code, _out, err = run_main(
        ["--history-dir", history, "--plots-dir", plots], capsys)
    assert code == 0
    warnings = err.splitlines()
    skipped = [*BAD_HISTORIES, "bad_json", "only_json"]
    assert len(warnings) == len(skipped) + 1
    assert all(line.startswith("plot.py: warning: ") for line in warnings)
    for name in skipped:
        assert sum(f"{name}.csv" in line for line in warnings) == 1, name
    assert any("partial.csv" in line and "last row" in line
               for line in warnings)
    assert "Traceback" not in err
    rows = table((plots / "timing.md").read_text())
    assert list(rows) == ["batchnorm", "renorm", "keras-renorm"]
    assert rows["keras-renorm"]["epochs"] == "2/4"
    assert rows["keras-renorm"]["median s/epoch"] == "5.50"
    assert_png(plots / "curves.png")
    assert_png(plots / "seconds_per_epoch.png")


def test_diverged_run_with_nan_metrics_is_kept(two_norms, tmp_path, capsys):
    history, _ = two_norms
    write_run(history, "diverged", "keras-renorm", [3.0] * 4,
              [0.2, 0.1, 0.1, 0.1])
    text = (history / "diverged.csv").read_text().splitlines()
    text[2] = "2,3.0,0.5,nan,0.1,nan,0.1,0.1"
    (history / "diverged.csv").write_text("\n".join(text) + "\n")
    code, out, err = run_main(
        ["--history-dir", history, "--plots-dir", tmp_path / "plots"], capsys)
    assert code == 0 and err == ""
    assert table(out)["keras-renorm"]["best val acc (%)"] == "20.00"


@pytest.mark.parametrize("setup", ["empty", "missing", "all_bad"])
def test_no_usable_history_is_one_error_line(tmp_path, capsys, setup):
    history = tmp_path / "history"
    if setup == "empty":
        history.mkdir()
    elif setup == "all_bad":
        history.mkdir()
        (history / "x.csv").write_text("")
    code, out, err = run_main(
        ["--history-dir", history, "--plots-dir", tmp_path / "plots"], capsys)
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert len(lines) == (2 if setup == "all_bad" else 1)
    assert lines[-1].startswith("plot.py: error: no usable history")
    assert str(history) in lines[-1]
    assert not (tmp_path / "plots").exists()


def test_named_runs_select_only_those(two_norms, tmp_path, capsys):
    history, data = two_norms
    plots = tmp_path / "plots"
    code, out, err = run_main(
        ["bn1", history / "brn0.csv", "--history-dir", history,
         "--plots-dir", plots], capsys)
    assert code == 0 and err == ""
    rows = table(out)
    assert "2 run(s)" in out
    assert rows["batchnorm"]["runs"] == "1"
    assert rows["batchnorm"]["median s/epoch"] == (
        f"{np.median(data['bn1'][0]):.2f}")
    code, out, err = run_main(
        ["nosuchrun", "--history-dir", history, "--plots-dir", plots], capsys)
    assert code == 1
    assert "nosuchrun.csv" in err.splitlines()[0]


def test_bad_arguments_and_help(capsys):
    assert plot.main(["--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [("plot.py: error: unrecognized arguments: "
                                 "--no-such-flag (see plot.py --help)")]
    with pytest.raises(SystemExit) as exit_info:
        plot.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--history-dir" in help_text and "timing.md" in help_text



def test_readme_block_is_replaced_by_the_table(two_norms, tmp_path, capsys):
    history, _ = two_norms
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{plot.README_BEGIN}\nold table\n"
                      f"{plot.README_END}\nafter\n")
    code, _out, err = run_main(["--history-dir", history, "--plots-dir",
                               tmp_path / "plots", "--readme", readme], capsys)
    assert code == 0, err
    text = readme.read_text()
    assert "old table" not in text
    assert text.startswith("# Title\n\nbefore\n" + plot.README_BEGIN + "\n")
    assert text.endswith(plot.README_END + "\nafter\n")
    rows = table(text)
    assert list(rows) == ["batchnorm", "renorm"]
    timing = (tmp_path / "plots" / "timing.md").read_text()
    assert timing.split("\n\n", 1)[1] in text


def test_readme_without_the_block_is_an_error(two_norms, tmp_path, capsys):
    history, _ = two_norms
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n")
    code, _out, err = run_main(["--history-dir", history, "--plots-dir",
                               tmp_path / "plots", "--readme", readme], capsys)
    assert code == 1
    assert err.startswith("plot.py: error:") and "README.md" in err
    assert len(err.strip().splitlines()) == 1
    assert readme.read_text() == "# no markers here\n"


def header_of(text):
    """The header cells of the first Markdown table in `text`."""
    line = next(line for line in text.splitlines() if line.startswith("| "))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_table_leads_with_test_accuracy(tmp_path, capsys):
    """Test accuracy (last, then best-val weights), then validation, then
    seconds; the note says where validation images come from. The old
    order (seconds first, no test columns) is gone."""
    history = tmp_path / "history"
    for seed, (last, best) in enumerate([(0.40, 0.42), (0.50, 0.48)]):
        write_run(history, f"bn{seed}", "batchnorm", [1.0, 1.0], [0.3, 0.4],
                  seed=seed, val_from="train", val_size=5000,
                  result={"test_accuracy": last, "best_test_accuracy": best,
                          "best_val_accuracy": 0.4, "best_epoch": 2,
                          "test_images": 10000})
    # An older history: no best_test_accuracy; another: no result at all.
    write_run(history, "brn0", "renorm", [2.0, 2.0], [0.3, 0.35],
              val_from="train", val_size=5000,
              result={"test_accuracy": 0.3, "test_images": 10000})
    write_run(history, "brn1", "renorm", [2.0, 2.0], [0.3, 0.35], seed=1,
              val_from="train", val_size=5000)
    code, out, err = run_main(
        ["--history-dir", history, "--plots-dir", tmp_path / "plots"], capsys)
    assert code == 0 and err == ""
    assert header_of(out) == [
        "group", "runs", "epochs", "test acc, last weights (%)",
        "test acc, best-val weights (%)", "best val acc (%)",
        "final val acc (%)", "median s/epoch", "ratio to batchnorm", "code",
        "device", "backend"]
    rows = table(out)
    assert rows["batchnorm"]["test acc, last weights (%)"] == percent(
        [0.40, 0.50])
    assert rows["batchnorm"]["test acc, best-val weights (%)"] == percent(
        [0.42, 0.48])
    assert rows["renorm"]["test acc, last weights (%)"] == (
        "30.00 (1 of 2 runs)")
    assert rows["renorm"]["test acc, best-val weights (%)"] == "–"
    assert rows["renorm"]["median s/epoch"] == "2.00"
    assert "all 10000 test images" in out
    assert "5000 images held out of the training set" in out


def test_no_best_val_column_without_it(two_norms, tmp_path, capsys):
    history, _ = two_norms
    _code, out, _err = run_main(
        ["--history-dir", history, "--plots-dir", tmp_path / "plots"], capsys)
    assert header_of(out)[3:5] == ["test acc, last weights (%)",
                                   "best val acc (%)"]
    assert table(out)["renorm"]["test acc, last weights (%)"] == "–"
    assert ("Validation: each run's best and final epoch, on the whole "
            "test set (as in 2017") in out


def test_provenance_is_flagged_not_grouped(tmp_path, capsys):
    """Runs of other commits, a dirty tree or none recorded stay repeats of
    one group, but the group is flagged on stderr and in timing.md."""
    history = tmp_path / "history"
    other = dict(PROVENANCE, commit="cd" * 20)
    write_run(history, "bn0", "batchnorm", [1.0], [0.5])
    write_run(history, "bn1", "batchnorm", [1.0], [0.5], seed=1)
    write_run(history, "brn0", "renorm", [1.0], [0.5])
    write_run(history, "brn1", "renorm", [1.0], [0.5], seed=1,
              provenance=other)
    write_run(history, "k0", "keras-renorm", [1.0], [0.5],
              provenance=dict(PROVENANCE, dirty=True))
    write_run(history, "k1", "keras-renorm", [1.0], [0.5], seed=1,
              provenance=None)
    write_run(history, "x0", "other", [1.0], [0.5],
              provenance=dict(PROVENANCE, commit=None))
    code, out, err = run_main(
        ["--history-dir", history, "--plots-dir", tmp_path / "plots"], capsys)
    assert code == 0 and "Traceback" not in err
    rows = table(out)
    assert list(rows) == ["batchnorm", "renorm", "keras-renorm", "other"]
    assert [rows[g]["runs"] for g in rows] == ["2", "2", "2", "1"]
    assert rows["batchnorm"]["code"] == ("ab" * 20)[:7]
    assert rows["renorm"]["code"] == (
        f"⚠ 2 commits ({('ab' * 20)[:7]}, {('cd' * 20)[:7]})")
    assert rows["keras-renorm"]["code"].startswith(
        "⚠ 1 of 2 runs without provenance; dirty tree")
    assert rows["other"]["code"] == "⚠ commit unknown"
    warnings = err.splitlines()
    assert len(warnings) == 4
    assert all(line.startswith("plot.py: warning: 1 group(s) of runs ")
               for line in warnings)
    assert any("different commits" in w and "renorm (2 commits)" in w
               for w in warnings)
    assert any("dirty tree" in w and "keras-renorm" in w for w in warnings)
    assert any("no provenance" in w and "keras-renorm" in w for w in warnings)
    assert any("unknown commit" in w and "other" in w for w in warnings)
    assert not any(w.count("batchnorm") for w in warnings)


# ------------------------------------------- batch sizes, non-i.i.d. runs
def sweep_table(text):
    """The batch-size table of timing.md: header, rows by (norm, sampling)."""
    part = text.split("Validation accuracy by batch size and sampling", 1)[1]
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in part.splitlines() if line.startswith("| ")]
    return rows[0], {(row[0], row[1]): row[2:] for row in rows[1:]}


def test_batch_size_and_non_iid_figures_and_table(tmp_path, capsys):
    history = tmp_path / "history"
    accuracy = {}
    for norm in ("batchnorm", "renorm"):
        for batch_size in (4, 32, 128):
            for classes in (None, 2):
                if norm == "renorm" and batch_size == 128 and classes:
                    continue  # a missing cell
                seeds = (0, 1) if batch_size == 32 else (0,)
                for seed in seeds:
                    acc = [0.3, 0.5 + 0.01 * seed, 0.45]
                    if classes and norm == "batchnorm":
                        acc = [a - 0.1 for a in acc]
                    name = f"{norm}-{batch_size}-{classes}-{seed}"
                    config = {"batch_size": batch_size, "seed": seed}
                    if classes:  # i.i.d. runs: no key, as in old histories
                        config["classes_per_batch"] = classes
                    write_run(history, name, norm, [1.0, 1.0, 1.0], acc,
                              **config)
                    accuracy.setdefault((norm, batch_size, classes),
                                        []).append(acc)
    plots = tmp_path / "plots"
    code, out, err = run_main(
        ["--history-dir", history, "--plots-dir", plots], capsys)
    assert code == 0 and err == ""
    assert sorted(p.name for p in plots.iterdir()) == [
        "accuracy_vs_batch_size.png", "curves.png", "non_iid.png",
        "seconds_per_epoch.png", "timing.md"]
    for name in ("accuracy_vs_batch_size.png", "non_iid.png"):
        assert_png(plots / name)
    timing = (plots / "timing.md").read_text()
    assert out == timing
    groups = table(timing)
    assert "batchnorm, batch_size=4, i.i.d." in groups
    assert "renorm, batch_size=32, 2 classes/batch" in groups
    header, rows = sweep_table(timing)
    assert header == ["norm", "sampling", "batch 4", "batch 32", "batch 128"]
    assert list(rows) == [("batchnorm", "i.i.d."),
                          ("batchnorm", "2 classes/batch"),
                          ("renorm", "i.i.d."), ("renorm", "2 classes/batch")]
    for (norm, sampling), cells in rows.items():
        classes = None if sampling == "i.i.d." else 2
        for batch_size, cell in zip((4, 32, 128), cells):
            runs = accuracy.get((norm, batch_size, classes))
            if runs is None:
                assert cell == "–"
                continue
            assert cell == (f"{percent([max(a) for a in runs])} / "
                            f"{percent([a[-1] for a in runs])}")
    assert rows[("batchnorm", "i.i.d.")][1] == "50.50 ± 0.71 / 45.00 ± 0.00"
    # No run has a test result: no test accuracy table.
    assert "Test accuracy by batch size" not in timing


def test_table_of_test_accuracy(tmp_path, capsys):
    history = tmp_path / "history"
    tests = {("batchnorm", 4): [0.25, 0.35], ("batchnorm", 32): [0.5],
             ("renorm", 4): [0.4], ("renorm", 32): [0.45]}
    for (norm, batch_size), values in tests.items():
        for seed, value in enumerate(values):
            write_run(history, f"{norm}-{batch_size}-{seed}", norm,
                      [1.0, 1.0], [0.3, 0.2], batch_size=batch_size,
                      seed=seed, result={"test_accuracy": value,
                                         "test_images": 10000})
    code, out, err = run_main(
        ["--history-dir", history, "--plots-dir", tmp_path / "plots"],
        capsys)
    assert code == 0 and err == ""
    part = out.split("Test accuracy by batch size and sampling", 1)[1]
    assert part.split(")", 1)[0].endswith("all 10000 test images; mean ± std "
                                          "over runs where there are several")
    part = part.split("Validation accuracy by batch size", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in part.splitlines() if line.startswith("| ")]
    assert rows[0] == ["norm", "sampling", "batch 4", "batch 32"]
    assert rows[1:] == [["batchnorm", "i.i.d.", percent([0.25, 0.35]),
                         "50.00"], ["renorm", "i.i.d.", "40.00", "45.00"]]
    assert rows[1][2] == "30.00 ± 7.07"
    # The validation table is still there, after it.
    _header, by_line = sweep_table(out)
    assert by_line[("renorm", "i.i.d.")] == ["30.00 / 20.00"] * 2


def test_one_batch_size_with_non_iid_runs(tmp_path, capsys):
    history = tmp_path / "history"
    for norm in ("batchnorm", "renorm"):
        write_run(history, f"{norm}-iid", norm, [1.0, 1.0], [0.4, 0.5],
                  batch_size=8, classes_per_batch=None)
        write_run(history, f"{norm}-k4", norm, [1.0, 1.0], [0.3, 0.2],
                  batch_size=8, classes_per_batch=4)
    plots = tmp_path / "plots"
    code, out, err = run_main(
        ["--history-dir", history, "--plots-dir", plots], capsys)
    assert code == 0 and err == ""
    assert sorted(p.name for p in plots.iterdir()) == [
        "curves.png", "non_iid.png", "seconds_per_epoch.png", "timing.md"]
    assert_png(plots / "non_iid.png")
    header, rows = sweep_table(out)
    assert header == ["norm", "sampling", "batch 8"]
    assert rows[("renorm", "4 classes/batch")] == ["30.00 / 20.00"]


# ------------------------------------------------------- legible figures
def sweep_groups(history):
    """24 groups as sweep.py makes them: 3 norms x 4 batch sizes x 2
    samplings, renorm's warm-up 8 of 10 steps per epoch."""
    for norm in ("batchnorm", "renorm", "keras-renorm"):
        for batch_size in (4, 8, 32, 128):
            for classes in (None, 2):
                write_run(history, f"{norm}-{batch_size}-{classes}", norm,
                          [3.0, 2.0, 2.0], [0.2, 0.3, 0.35],
                          batch_size=batch_size, classes_per_batch=classes,
                          warmup_steps=15, steps_per_epoch=10,
                          norm_momentum=1 - batch_size / 1000)
    return histories.group_runs(histories.load_runs(histories.history_paths([], history)))


def overlaps(artists, renderer):
    """Pairs of the artists' drawn boxes that overlap."""
    boxes = [a.get_window_extent(renderer) for a in artists
             if a.get_visible() and a.get_text()]
    return [(i, j) for i in range(len(boxes)) for j in range(i)
            if boxes[i].overlaps(boxes[j])]


def test_curves_of_many_groups_are_faceted(tmp_path):
    groups = sweep_groups(tmp_path / "history")
    assert len(groups) == 24
    assert curves_study.facet_fields(groups) == ["batch_size"]
    fig = curves_study.plot_curves(groups, [r for g in groups for r in g.runs])
    axes = fig.axes
    assert len(axes) == 4 * 4  # a row per batch size, a column per metric
    for ax in axes:
        curves = [line for line in ax.get_lines()
                  if len(set(line.get_xdata())) > 1]
        assert len(curves) == 6  # 3 norms x 2 samplings
        assert len({(line.get_color(), line.get_linestyle())
                    for line in curves}) == 6
        # renorm's warm-up ends at 15 / 10 = 1.5 epochs: one mark per
        # renorm group in the panel, none for the others
        marks = [line for line in ax.get_lines()
                 if len(set(line.get_xdata())) == 1]
        assert [line.get_xdata()[0] for line in marks] == [1.5, 1.5]
    assert "norm momentum" in fig._suptitle.get_text()
    plt.close(fig)


def test_curves_of_two_groups_keep_one_row(two_norms):
    history, _ = two_norms
    groups = histories.group_runs(histories.load_runs(histories.history_paths([], history)))
    assert curves_study.facet_fields(groups) == []
    fig = curves_study.plot_curves(groups, [r for g in groups for r in g.runs])
    assert len(fig.axes) == 4
    # No steps_per_epoch in these histories: no warm-up mark.
    assert all(len(ax.get_lines()) == 2 for ax in fig.axes)
    plt.close(fig)


def test_seconds_of_many_groups_are_not_overprinted(tmp_path):
    groups = sweep_groups(tmp_path / "history")
    fig = curves_study.plot_seconds(groups, [r for g in groups for r in g.runs])
    (ax,) = fig.axes
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert sorted(labels) == sorted(g.label for g in groups)
    assert labels[:3] == ["batchnorm, batch_size=4, i.i.d.",
                          "renorm, batch_size=4, i.i.d.",
                          "keras-renorm, batch_size=4, i.i.d."]
    assert not overlaps(ax.get_yticklabels(), renderer)
    assert not overlaps(ax.texts, renderer)
    assert len(ax.texts) == 24 and ax.texts[1].get_text() == "2.00 s  ×1.00"
    plt.close(fig)


def test_sweep_figures_of_many_lines_get_a_row_per_setting(tmp_path, capsys):
    """3 norms x 2 samplings x 2 learning rates: 12 lines, more than a
    panel holds; a row of panels per learning rate, 6 lines each."""
    history = tmp_path / "history"
    for norm in ("batchnorm", "renorm", "keras-renorm"):
        for batch_size in (4, 32):
            for classes in (None, 2):
                for lr in (0.1, 0.01):
                    write_run(history, f"{norm}-{batch_size}-{classes}-{lr}",
                              norm, [1.0, 1.0], [0.3, 0.4 + lr],
                              batch_size=batch_size, lr=lr,
                              classes_per_batch=classes,
                              result={"test_accuracy": 0.3 + lr,
                                      "test_images": 10000})
    plots = tmp_path / "plots"
    code, _out, err = run_main(
        ["--history-dir", history, "--plots-dir", plots], capsys)
    assert code == 0 and err == ""
    runs = histories.load_runs(histories.history_paths([], history))
    points = sweep_study.sweep_points(runs)
    fig = sweep_study.plot_accuracy_vs_batch_size(points, runs)
    assert len(fig.axes) == 2 * 3  # a row per lr; test, best, final
    assert fig.axes[0].get_title() == "test accuracy (last weights), lr=0.01"
    assert all(len(ax.containers) == 6 for ax in fig.axes)  # errorbars
    plt.close(fig)
    fig = sweep_study.plot_non_iid(points, runs)
    assert len(fig.axes) == 2 * 2
    plt.close(fig)
    for name in ("accuracy_vs_batch_size.png", "non_iid.png", "curves.png"):
        assert_png(plots / name)


def test_table_of_test_accuracy_with_best_val_weights(tmp_path, capsys):
    history = tmp_path / "history"
    for batch_size in (4, 32):
        write_run(history, f"bn-{batch_size}", "batchnorm", [1.0], [0.3],
                  batch_size=batch_size,
                  result={"test_accuracy": 0.25, "best_test_accuracy": 0.5,
                          "test_images": 10000})
    code, out, err = run_main(
        ["--history-dir", history, "--plots-dir", tmp_path / "plots"],
        capsys)
    assert code == 0 and err == ""
    part = out.split("**Test accuracy by batch size and sampling** (", 1)[1]
    assert part.startswith("%, the last / the best-val weights on all 10000")
    assert "| batchnorm | i.i.d.   | 25.00 / 50.00 | 25.00 / 50.00 |" in part
    # The test table comes before the validation table.
    assert part.index("Validation accuracy by batch size") > part.index(
        "25.00 / 50.00")


def test_odd_values_in_a_history_are_no_traceback(two_norms, tmp_path,
                                                  capsys):
    """Values of unexpected types (a hand-edited or future history) are
    grouped, described and flagged, never a traceback."""
    history, _ = two_norms
    write_run(history, "odd", "renorm", [1.0, 1.0], [0.2, 0.3],
              protocol=["seed"], provenance="abc", result=[0.5],
              warmup_steps="x", steps_per_epoch=0, devices=[0, 1],
              precision={"policy": "mixed"}, val_size=[1], depth=None)
    code, out, err = run_main(
        ["--history-dir", history, "--plots-dir", tmp_path / "plots"], capsys)
    assert code == 0 and "Traceback" not in err
    assert len(table(out)) == 3
    assert err.count("\n") == 1 and "no provenance" in err


# ------------------------------------------------------ the microbatch study
# Test accuracies (%) by (norm, V, sampling), one per seed 0-3: the cells of
# a tiny microbatch study.
MICRO = {
    ("batchnorm", 4, "iid"): [40.0, 42.0, 41.0, 45.0],
    ("renorm", 4, "iid"): [43.0, 44.5, 42.0, 47.0],
    ("batchnorm", 128, "iid"): [50.0, 51.0, 49.0, 52.0],
    ("renorm", 128, "iid"): [50.5, 50.0, 49.5, 52.5],
    ("keras-renorm", None, "iid"): [49.0, 50.0, 48.0, 51.0],
    ("batchnorm", 4, "pairs"): [30.0, 33.0, 31.0, 32.0],
    ("renorm", 4, "pairs"): [38.0, 40.0, 36.0, 41.0],
    ("batchnorm", 128, "pairs"): [49.0, 50.0, 48.0, 50.0],
    ("renorm", 128, "pairs"): [49.5, 51.0, 47.0, 50.0],
}


def write_micro_study(history):
    for (norm, virtual, sampling), values in MICRO.items():
        for seed, value in enumerate(values):
            write_run(history, f"micro-{norm}-v{virtual}-{sampling}-s{seed}",
                      norm, [1.0, 1.0], [0.3, 0.4], seed=seed,
                      virtual_batch_size=virtual, sampling=sampling,
                      result={"test_accuracy": value / 100,
                              "test_images": 10000})


def micro_table(text, title):
    """The rows of the microbatch table after `title`, as lists of cells."""
    part = text.split(title, 1)[1].split("\n\n", 2)[1]
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in part.splitlines() if line.startswith("| ")]
    return rows[0], rows[1:]


def test_t_interval_by_hand_and_by_scipy():
    """t(0.975, 3) = 3.182446 (a t table); the half width is t s / sqrt(n)."""
    from scipy import stats

    from experiment import report

    values = [3.0, 2.5, 1.0, 2.0]  # renorm - batchnorm, V 4, i.i.d.
    mean, half = report.t_interval(values)
    s = np.sqrt(sum((v - 2.125) ** 2 for v in values) / 3)
    assert mean == pytest.approx(2.125)
    assert half == pytest.approx(3.182446 * s / 2, rel=1e-6)
    low, high = stats.t.interval(0.95, 3, loc=np.mean(values),
                                 scale=stats.sem(values))
    assert (mean - half, mean + half) == pytest.approx((low, high))
    assert report.t_interval([5.0]) == (5.0, None)
    assert report.interval_text([2.0]) == "+2.00 (n=1)"
    assert report.paired_differences({0: 3.0, 1: 2.0, 2: 1.0},
                                     {0: 1.0, 2: 4.0, 3: 0.0}) == {0: 2.0,
                                                                   2: -3.0}


def test_microbatch_figure_and_tables(tmp_path, capsys):
    from experiment import report

    history = tmp_path / "history"
    write_micro_study(history)
    plots = tmp_path / "plots"
    code, out, err = run_main(["--history-dir", history, "--plots-dir",
                               plots], capsys)
    assert code == 0, err
    assert_png(plots / "microbatch.png")
    # One batch size, no classes per batch: not the batch study's figures.
    assert not (plots / "accuracy_vs_batch_size.png").exists()
    timing = (plots / "timing.md").read_text()
    assert out == timing

    header, rows = micro_table(timing, "Test accuracy by normalization group")
    # keras-renorm's whole batch (recorded as none) is V = its batch, 128.
    assert header == ["norm", "sampling", "V=4", "V=128"]
    by_line = {(r[0], r[1]): r[2:] for r in rows}
    assert list(by_line) == [("batchnorm", "i.i.d."), ("batchnorm", "pairs"),
                             ("renorm", "i.i.d."), ("renorm", "pairs"),
                             ("keras-renorm", "i.i.d.")]
    values = MICRO[("batchnorm", 4, "iid")]
    assert by_line[("batchnorm", "i.i.d.")][0] == (
        f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} (4)")
    assert by_line[("keras-renorm", "i.i.d.")] == ["–", "49.50 ± 1.29 (4)"]

    header, rows = micro_table(timing, "renorm - batchnorm, paired by seed")
    assert header == ["sampling", "V=4", "V=128"]
    gains = {r[0]: r[1:] for r in rows}
    for sampling, name in (("iid", "i.i.d."), ("pairs", "pairs")):
        for column, virtual in enumerate((4, 128)):
            differences = np.subtract(MICRO[("renorm", virtual, sampling)],
                                      MICRO[("batchnorm", virtual, sampling)])
            mean, half = report.t_interval(differences)
            assert gains[name][column] == (
                f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] (n=4)")
    # The i.i.d. V = 4 cell: differences 3, 2.5, 1, 2 (the hand computation
    # above): 2.125 +- 3.182446 * 0.853913 / 2 = 2.125 +- 1.359.
    assert gains["i.i.d."][0] == "+2.12 [+0.77, +3.48] (n=4)"

    header, rows = micro_table(timing, "Accuracy lost as the groups shrink")
    lost = {(r[0], r[1]): r[2:] for r in rows}
    assert ("keras-renorm", "i.i.d.") not in lost  # one V only
    differences = np.subtract(MICRO[("batchnorm", 128, "pairs")],
                              MICRO[("batchnorm", 4, "pairs")])
    mean, half = report.t_interval(differences)
    assert lost[("batchnorm", "pairs")] == [
        "128 → 4", (f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] "
                    "(n=4)")]


def test_microbatch_study_groups_by_virtual_batch_and_sampling(tmp_path):
    history = tmp_path / "history"
    write_micro_study(history)
    runs = histories.load_runs(histories.history_paths([], history))
    groups = histories.group_runs(runs)
    # Runs that differ in V or in sampling are not pooled as seeds.
    assert len(groups) == len(MICRO)
    assert all(len(g.runs) == 4 for g in groups)
    labels = {g.label for g in groups}
    assert "batchnorm, virtual batch 4, i.i.d." in labels
    assert "renorm, virtual batch 128, sampling pairs" in labels
    assert "keras-renorm, whole batch, i.i.d." in labels
    points = microbatch_study.micro_points(runs)
    assert [(p.norm, p.sampling, p.x) for p in points][:3] == [
        ("batchnorm", "iid", 4), ("batchnorm", "iid", 128),
        ("batchnorm", "pairs", 4)]
    # A run without its result yet (unfinished) is left out of its cell.
    cell = next(p for p in points if (p.norm, p.sampling, p.x)
                == ("renorm", "pairs", 4))
    del cell.runs[0].config["result"]
    assert sorted(cell.by_seed()) == [1, 2, 3]
