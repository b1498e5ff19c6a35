"""sweep.py: a tiny sweep of each study end to end (fake CIFAR-10,
WRN-10-1, 1 epoch), resuming one, their plans and their bad input."""

import csv
import json
import os
import signal
import threading
import time

import pytest

from experiment import protocols

import sweep
import train

pytestmark = pytest.mark.backend_independent

NORMS = ("renorm",)  # the microbatch study's runs have batchnorm too
BATCH_SIZES = (10, 20)
SCHEDULE = (0.25, 0.5, 0.75)  # the cpu preset's
MOMENTUM_IMAGES = 320  # the cpu preset's
CPU = sweep.PRESETS["batch"]["cpu"]


def sweep_args(data_dir, out, *extra):
    """A tiny sweep: renorm x 2 batch sizes x (i.i.d., 2 classes/batch)."""
    return ["--data-dir", str(data_dir), "--history-dir", str(out / "history"),
            "--weights-dir", str(out / "weights"),
            "--plots-dir", str(out / "plots"), "--depth", "10", "--width", "1",
            "--train-size", "100", "--val-size", "20", "--epochs", "1",
            "--norms", *NORMS,
            "--batch-sizes", *map(str, BATCH_SIZES), "--sampling", "iid", "k2",
            *extra]


def names():
    return [f"sweep-{norm}-b{batch}-{sampling}" for batch in BATCH_SIZES
            for sampling in ("iid", "k2") for norm in NORMS]


def momenta(args):
    """Each batch size's --norm-momentum in the runs planned for `args`."""
    runs, _ = sweep.plan(args)
    return {int(argv[argv.index("--batch-size") + 1]):
            float(argv[argv.index("--norm-momentum") + 1]) for _, argv in runs}


def table_rows(text):
    """The rows of the batch-size table in timing.md, by (norm, sampling)."""
    part = text.split("Validation accuracy by batch size and sampling", 1)[1]
    lines = part.splitlines()  # its first table only
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines))
                if not lines[i].startswith("|")), len(lines))
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in lines[start:end] if line.startswith("| ")]
    header = rows[0]
    return header, {(row[0], row[1]): dict(zip(header, row))
                    for row in rows[1:]}


def test_tiny_sweep_end_to_end(data_dir, tmp_path, capsys):
    assert sweep.main(sweep_args(data_dir, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "4 runs (0 finished, 4 to train)" in out
    history = tmp_path / "history"
    for name in names():
        with open(history / f"{name}.csv", newline="") as file:
            rows = list(csv.DictReader(file))
        assert [row["epoch"] for row in rows] == ["1"]
        assert 0 <= float(rows[0]["val_accuracy"]) <= 1
        record = json.loads((history / f"{name}.json").read_text())
        for key in protocols.CONFIG_KEYS:
            assert key in record, key
        norm, batch, sampling = name.split("-")[1:]
        batch_size = int(batch[1:])
        assert record["norm"] == norm and record["batch_size"] == batch_size
        assert record["classes_per_batch"] == (None if sampling == "iid"
                                               else 2)
        assert (record["depth"], record["width"]) == (10, 1)
        assert (record["train_size"], record["val_size"]) == (100, 20)
        assert record["lr"] == 1e-3 and record["optimizer"] == "adam"
        # The moving statistics average over 320 images at every batch size.
        assert record["norm_momentum"] == pytest.approx(
            1 - batch_size / MOMENTUM_IMAGES)
        # The schedule: fractions of this run's steps, resolved and recorded.
        steps = record["steps_per_epoch"]
        assert steps == 100 // batch_size
        assert record["renorm_schedule"] == list(SCHEDULE)
        assert [record["warmup_steps"], record["d_max_steps"],
                record["r_max_steps"]] == [int(f * steps + 0.5)
                                           for f in SCHEDULE]
        assert "result" in record
    plots = tmp_path / "plots"
    assert sorted(p.name for p in plots.iterdir()) == sorted([
        "accuracy_vs_batch_size.png", "curves.png", "non_iid.png",
        "seconds_per_epoch.png", "timing.md"]
        + [f"{n}.corrections.png" for n in names()])
    for path in plots.glob("*.png"):
        assert path.stat().st_size > 10000
    timing = (plots / "timing.md").read_text()
    assert "4 run(s)" in timing
    header, rows = table_rows(timing)
    assert header == ["norm", "sampling", "batch 10", "batch 20"]
    assert list(rows) == [(norm, sampling) for norm in NORMS
                          for sampling in ("i.i.d.", "2 classes/batch")]
    for row in rows.values():
        for batch in BATCH_SIZES:
            best, final = row[f"batch {batch}"].split(" / ")
            assert 0 <= float(final) <= float(best) <= 100
    assert timing in out  # plot.py printed it

    # Run again: every run is finished, so nothing would train.
    before = {n: (history / f"{n}.csv").read_text() for n in names()}
    assert sweep.main(sweep_args(data_dir, tmp_path, "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "4 runs (4 finished, 0 to train)" in out
    assert out.count("(finished): python train.py") == 4

    # A run cut short after its last epoch (no final result yet) is resumed,
    # not started again; the finished ones are skipped.
    name = "sweep-renorm-b20-k2"
    path = history / f"{name}.json"
    record = json.loads(path.read_text())
    del record["result"]
    path.write_text(json.dumps(record))
    (plots / "non_iid.png").unlink()
    assert sweep.main(sweep_args(data_dir, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "4 runs (3 finished, 1 to train)" in out
    assert out.count("finished, skipped") == 3
    assert f"resuming run {name} after epoch 1 of 1" in out
    assert out.count("test accuracy") == 1
    assert "result" in json.loads(path.read_text())
    assert before == {n: (history / f"{n}.csv").read_text() for n in names()}
    assert (plots / "non_iid.png").is_file()  # plotted again


def test_plan_pairs_skips_and_names(tmp_path, capsys):
    args = ["--history-dir", str(tmp_path / "h"), "--dry-run",
            "--batch-sizes", "4", "8", "32", "--sampling", "iid", "pairs",
            "k2", "k3", "--norms", "renorm", "--seeds", "0", "1"]
    assert sweep.main(args) == 0
    out = capsys.readouterr().out
    assert "skipping batch 4, k3: 3 classes per batch do not divide" in out
    assert "skipping batch 32, pairs: 16 classes per batch are more than" in out
    runs = [line.split(" ", 1)[0] for line in out.splitlines()
            if line.startswith("sweep-")]
    assert runs == [
        "sweep-renorm-b4-iid", "sweep-renorm-b4-iid-s1",
        "sweep-renorm-b4-k2", "sweep-renorm-b4-k2-s1",  # pairs = k2 at 4
        "sweep-renorm-b8-iid", "sweep-renorm-b8-iid-s1",
        "sweep-renorm-b8-k4", "sweep-renorm-b8-k4-s1",
        "sweep-renorm-b8-k2", "sweep-renorm-b8-k2-s1",
        "sweep-renorm-b32-iid", "sweep-renorm-b32-iid-s1",
        "sweep-renorm-b32-k2", "sweep-renorm-b32-k2-s1"]
    assert not (tmp_path / "h").exists()  # a dry run writes nothing
    line = next(text for text in out.splitlines()
                if text.startswith("sweep-renorm-b8-k4-s1 "))
    for flag in ("--batch-size 8", "--classes-per-batch 4", "--seed 1",
                 "--norm-momentum 0.975", "--renorm-schedule 0.25,0.5,0.75",
                 f"--depth {CPU['depth']}", f"--width {CPU['width']}",
                 "--resume"):
        assert flag in line, flag


def test_presets_and_momentum():
    args = sweep.parse_args(["--preset", "gpu"])
    assert (args.depth, args.width, args.train_size, args.val_size) == (
        16, 4, None, None)
    assert momenta(args)[128] == pytest.approx(0.99)
    assert args.renorm_schedule == (0.04, 0.19, 0.31)
    args = sweep.parse_args([])
    assert (args.depth, args.width, args.train_size, args.epochs) == (
        10, 1, 1280, 3)
    assert momenta(args)[128] == pytest.approx(0.6)
    assert args.renorm_schedule == SCHEDULE
    args = sweep.parse_args(["--norm-momentum", "0.9", "--width", "3"])
    assert (args.depth, args.width) == (CPU["depth"], 3)
    assert set(momenta(args).values()) == {0.9}
    runs, _ = sweep.plan(sweep.parse_args(["--", "--augment"]))
    assert len(runs) == 24
    assert all(argv[-1] == "--augment" for _, argv in runs)
    for _, argv in runs:  # every run's flags parse
        train.parse_args(argv)


@pytest.mark.parametrize("args, words", [
    (["--batch-sizes", "0"], ["--batch-sizes"]),
    (["--sampling", "k0"], ["--sampling", "k0"]),
    (["--norms", "groupnorm"], ["--norms", "groupnorm"]),
    (["--sampling", "k3", "--batch-sizes", "4"], ["no run is possible"]),
    (["--momentum-images", "64"], ["--momentum-images 64", "128"]),
    (["--momentum-images", "2000", "--norm-momentum", "0.9"],
     ["--norm-momentum"]),
    (["--renorm-schedule", "0.5,0.1,0.2"], ["--renorm-schedule"]),
    (["--", "--batch-size", "3"], ["--batch-size after --"]),
])
def test_bad_input_is_one_error_line(args, words, tmp_path, capsys):
    assert sweep.main(["--history-dir", str(tmp_path / "h"), *args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sweep.py: error: ")
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "h").exists()


def test_failed_run_stops_the_sweep(tmp_path, capsys):
    args = ["--data-dir", str(tmp_path / "nowhere"),
            "--history-dir", str(tmp_path / "h"),
            "--weights-dir", str(tmp_path / "w"),
            "--plots-dir", str(tmp_path / "p"), "--norms", "renorm",
            "--batch-sizes", "8"]
    assert sweep.main(args) == 1
    err = capsys.readouterr().err
    assert "nowhere" in err
    assert "sweep.py: error: run sweep-renorm-b8-iid failed" in err
    assert not (tmp_path / "p").exists()


# A stand-in for train.py: says it is ready, waits for a signal (10 s at
# most) and exits 128 + the signal, as train.py does.
WAITER = """
import pathlib, signal, sys, time
for signum in signal.SIGINT, signal.SIGTERM:
    signal.signal(signum, lambda signum, _: sys.exit(128 + signum))
pathlib.Path(sys.argv[1]).write_text("ready")
time.sleep(10)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_and_the_sweep(signum, tmp_path, monkeypatch,
                                              capsys):
    """A SIGTERM to the sweep is passed on to the running train.py; a Ctrl-C
    reaches it from the terminal (sent to it here) while the sweep waits for
    its exit code; a Ctrl-C between runs exits 130."""
    script, ready = tmp_path / "waiter.py", tmp_path / "ready"
    script.write_text(WAITER)
    monkeypatch.setattr(sweep, "TRAIN", script)
    popen, children = sweep.subprocess.Popen, []

    def start(argv, **kwargs):
        children.append(popen(argv, **kwargs))
        return children[-1]

    def send():
        while not ready.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signum)  # the sweep
        if signum == signal.SIGINT:  # and, from the terminal, the run
            children[0].send_signal(signum)

    def ignored(signum, frame):  # a SIGTERM not passed on lands here
        pass

    monkeypatch.setattr(sweep.subprocess, "Popen", start)
    before = signal.signal(signal.SIGTERM, ignored)
    sender = threading.Thread(target=send)
    sender.start()
    try:
        code = sweep.train_all([("a", [str(ready)]), ("b", [])], done=[])
    except KeyboardInterrupt:
        code = "a KeyboardInterrupt in the sweep during a run"
    finally:
        sender.join()
        restored = signal.signal(signal.SIGTERM, before)
    assert code == 128 + signum
    assert len(children) == 1  # run b never started
    assert restored is ignored
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert "interrupted in run a; rerun" in capsys.readouterr().err

    def ctrl_c(script, argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_script", ctrl_c)
    assert sweep.main(["--history-dir", str(tmp_path / "h"),
                       "--batch-sizes", "8", "--norms", "renorm"]) == 130
    assert "interrupted; rerun" in capsys.readouterr().err


# ------------------------------------------------------ the microbatch study
def micro_args(data_dir, out, *extra):
    """A tiny microbatch study: batchnorm and renorm, V 4, pairs, seeds 0
    and 1 (4 runs of 1 step; V 128's record: test_train's
    test_statistics_in_the_record)."""
    return ["--study", "microbatch", "--data-dir", str(data_dir),
            "--history-dir", str(out / "history"),
            "--weights-dir", str(out / "weights"),
            "--plots-dir", str(out / "plots"), "--depth", "10", "--width", "1",
            "--train-size", "128", "--val-size", "20", "--epochs", "1",
            "--norms", "batchnorm", "renorm", "--virtual-batch-sizes", "4",
            "--sampling", "pairs", "--seeds", "0", "1", *extra]


def test_tiny_microbatch_study_end_to_end(data_dir, tmp_path, capsys):
    assert sweep.main(micro_args(data_dir, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "4 runs (0 finished, 4 to train)" in out
    names = [f"micro-{norm}-v4-pairs" + ("-s1" if seed else "")
             for seed in (0, 1) for norm in ("batchnorm", "renorm")]
    history = tmp_path / "history"
    renorms = [n for n in names if n.split("-")[1] == "renorm"]
    assert sorted(p.name for p in history.iterdir()) == sorted(
        [f"{n}.csv" for n in names] + [f"{n}.json" for n in names]
        + [f"{n}.corrections.csv" for n in renorms])  # renorm's r and d
    for name in names:
        record = json.loads((history / f"{name}.json").read_text())
        assert (record["norm"], record["batch_size"],
                record["virtual_batch_size"], record["sampling"]) == (
            name.split("-")[1], 128, 4, "pairs")
        assert record["seed"] == (1 if name.endswith("-s1") else 0)
        assert record["statistics"] == "per group of 4 consecutive examples"
        assert record["lr_milestones"] == [8] and record["lr_gamma"] == 0.1
        assert "result" in record
    plots = tmp_path / "plots"
    assert (plots / "microbatch.png").stat().st_size > 10000
    timing = (plots / "timing.md").read_text()
    assert "renorm - batchnorm, paired by seed" in timing
    assert "(n=2)" in timing
    assert sweep.main(micro_args(data_dir, tmp_path, "--dry-run")) == 0
    assert "4 runs (4 finished, 0 to train)" in capsys.readouterr().out


def test_microbatch_plan_presets_and_skips(tmp_path, capsys):
    args = sweep.parse_args(["--study", "microbatch"])
    preset = sweep.PRESETS["microbatch"]["cpu"]
    assert (args.depth, args.width, args.train_size, args.epochs) == (
        preset["depth"], preset["width"], preset["train_size"],
        preset["epochs"])
    assert args.virtual_batch_sizes == preset["virtual_batch_sizes"]
    assert args.seeds == preset["seeds"]
    assert args.history_dir == sweep.Path("history/microbatch")
    assert args.plots_dir == sweep.Path("plots/microbatch")
    assert sweep.parse_args([]).history_dir == sweep.Path("history/sweep")
    gpu = sweep.parse_args(["--study", "microbatch", "--preset", "gpu"])
    assert (gpu.depth, gpu.width, gpu.train_size) == (16, 4, None)
    assert gpu.virtual_batch_sizes == (2, 4, 8, 16, 128)
    assert len(gpu.seeds) >= 3
    assert momenta(gpu) == {128: pytest.approx(0.99)}
    runs, skipped = sweep.plan(args)
    # Per seed: 2 V x 2 samplings x 2 norms, and keras-renorm at V = 128.
    assert len(runs) == len(preset["seeds"]) * 10
    assert skipped == [("V 4, keras-renorm: it has no virtual batches "
                        "(trained at V = 128 only)")]
    for name, argv in runs:  # every run's flags parse
        config, _, _ = train.parse_args(argv)
        assert config["batch_size"] == 128 and config["name"] == name
        assert config["virtual_batch_size"] == (
            None if config["norm"] == "keras-renorm"
            else int(name.split("-v")[1].split("-")[0]))
    # The seeds outermost: a study cut short holds whole seeds.
    seeds = [train.parse_args(argv)[0]["seed"] for _, argv in runs]
    assert seeds == sorted(seeds)

    assert sweep.main(["--study", "microbatch", "--dry-run",
                       "--history-dir", str(tmp_path / "h"),
                       "--virtual-batch-sizes", "3", "4", "256",
                       "--seeds", "0"]) == 0
    out = capsys.readouterr().out
    assert "skipping V 3, pairs: a group of pairs needs an even V" in out
    assert "skipping V 256: more than the batch, 128" in out
    runs = [line.split(" ", 1)[0] for line in out.splitlines()
            if line.startswith("micro-")]
    assert runs == ["micro-batchnorm-v3-iid", "micro-renorm-v3-iid",
                    "micro-batchnorm-v4-iid", "micro-renorm-v4-iid",
                    "micro-batchnorm-v4-pairs", "micro-renorm-v4-pairs"]
    line = next(t for t in out.splitlines()
                if t.startswith("micro-renorm-v4-pairs "))
    for flag in ("--batch-size 128", "--virtual-batch-size 4",
                 "--sampling pairs", "--lr-milestones 8", "--lr-gamma 0.1",
                 "--renorm-schedule 0.25,0.5,0.75"):
        assert flag in line, flag
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("args, words", [
    (["--study", "microbatch", "--batch-sizes", "4"],
     ["--batch-sizes is the batch study's"]),
    (["--study", "microbatch", "--sampling", "k2"],
     ["--sampling k2 is the batch study's", "iid or pairs"]),
    (["--virtual-batch-sizes", "4"],
     ["--virtual-batch-sizes needs --study microbatch"]),
    (["--study", "microbatch", "--virtual-batch-sizes", "0"],
     ["--virtual-batch-sizes"]),
    (["--study", "microbatch", "--virtual-batch-sizes", "4",
      "--norms", "keras-renorm"], ["no run is possible",
                                   "--virtual-batch-sizes"]),
    (["--study", "microbatch", "--", "--virtual-batch-size", "8"],
     ["--virtual-batch-size after --"]),
    (["--study", "microbatch", "--", "--sampling=iid"],
     ["--sampling after --"]),
])
def test_microbatch_bad_input_is_one_error_line(args, words, tmp_path,
                                                capsys):
    assert sweep.main(["--history-dir", str(tmp_path / "h"), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sweep.py: error: ")
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "h").exists()
