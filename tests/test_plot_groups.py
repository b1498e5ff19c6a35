"""plot.py's grouping: runs are repeats only where every setting but the
seed (and name, timings, provenance) is equal; and its figure titles, which
state every setting that departs from the protocol (no Keras involved)."""

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest

from test_plot import full_config
from test_plot import write_run

from experiment import curves_study
from experiment import histories
from experiment import microbatch_study
from experiment import report
from experiment.protocols import CONFIG_KEYS, PROTOCOLS

pytestmark = pytest.mark.backend_independent

FRAME = pd.DataFrame({"epoch": [1.0, 2.0], "seconds": [1.0, 1.0],
                      "loss": [2.0, 1.0], "accuracy": [0.2, 0.3],
                      "val_loss": [2.1, 1.1], "val_accuracy": [0.2, 0.3]})
# Every key that must split groups: the configuration's, less the seed and
# the name, and the environment's.
SPLITTING = ([k for k in CONFIG_KEYS if k not in ("seed", "name")]
             + ["backend", "device"])


def run(name, **changes):
    config = full_config(
        name=name, steps_per_epoch=10, sessions=[],
        result={"test_accuracy": 0.5},
        provenance={"commit": "0" * 40, "dirty": False, "version": "0.1.0"})
    return histories.Run(name, Path(f"{name}.csv"), {**config, **changes},
                         FRAME)


def another(value):
    """A value of the same kind as `value` that differs from it."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, (list, tuple)):
        return [*value, 7]
    return 2  # None: e.g. classes_per_batch, renorm_schedule


@pytest.mark.parametrize("key", SPLITTING)
def test_runs_that_differ_in_any_one_key_are_two_groups(key):
    base = run("base")
    value = base.config[key]
    other = run("other", seed=1, **{key: another(value)})
    groups = histories.group_runs([base, other])
    assert len(groups) == 2, key
    assert all(len(g.runs) == 1 for g in groups)
    if key != "norm":
        # The label says what differs.
        assert len({g.label for g in groups}) == 2


def test_runs_that_differ_only_in_seed_name_timing_provenance_are_repeats():
    base = run("base")
    other = run("other", seed=3, steps_per_epoch=10,
                sessions=[{"started": "x"}], result={"test_accuracy": 0.1},
                provenance={"commit": "1" * 40, "dirty": True,
                            "version": "0.1.0"})
    other = dataclasses.replace(other, frame=FRAME.assign(seconds=9.0))
    groups = histories.group_runs([base, other])
    assert [len(g.runs) for g in groups] == [2]
    assert groups[0].label == "renorm"


def test_a_history_lacking_a_key_is_skipped_and_named(tmp_path, capsys):
    """Every history carries every configuration key and the environment's;
    one that lacks some is skipped, with one line that names them."""
    history = tmp_path / "history"
    for name in ("full", "old"):
        write_run(history, name, "renorm", [1.0], [0.5])
    config = json.loads((history / "old.json").read_text())
    del config["precision"], config["device"]
    (history / "old.json").write_text(json.dumps(config))
    runs = histories.load_runs(histories.history_paths([], history))
    assert [run.name for run in runs] == ["full"]
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"plot.py: warning: skipping {history / 'old.csv'}: "
                    "old.json lacks the key(s) precision, device")


def test_the_reported_merge_is_split():
    """The copy of a run with XLA, no warm-up, momentum 0.9 and halved
    seconds is its own group, labelled by what differs."""
    base = run("base")
    copy = run("copy", jit_compile=True,
               warmup_steps=0, norm_momentum=0.9)
    copy = dataclasses.replace(copy, frame=FRAME.assign(seconds=0.5))
    labels = [g.label for g in histories.group_runs([base, copy])]
    # The first key that splits them is named; the others go with it.
    assert sorted(labels) == ["renorm, jit_compile=True",
                              "renorm, jit_compile=auto"]


# ------------------------------------------------------------------ titles
def test_title_of_the_full_protocol_says_so():
    lines = report.describe_runs([run("a"), run("b", seed=1)])
    assert lines == ["protocol seed as specified, on the full data set",
                     "on CPU (tensorflow)"]


def test_title_states_each_departure_of_a_cpu_run():
    cpu = run("cpu", depth=16, width=2, train_size=3200, val_size=1000,
              epochs=10, device="CPU: AMD EPYC, 2 cores",
              precision="mixed_float16")
    title = report.figure_title("Training curves", [], [cpu])
    assert title.replace("\n", " ") == (
        "Training curves "
        "protocol seed, except: WRN-16-2, 3200 training images, 1000 "
        "held-out validation images, 10 epochs, precision mixed_float16 "
        "on CPU: AMD EPYC, 2 cores (tensorflow)")
    old = run("old", val_from="test", val_size=1000)
    assert report.describe_runs([old])[0] == (
        "protocol seed, except: validation on 1000 test images (as in 2017)")
    assert max(map(len, title.split("\n"))) <= report.TITLE_WIDTH


@pytest.mark.parametrize("changes, text", [
    ({"optimizer": "sgd"}, "optimizer sgd"),
    ({"lr_milestones": [5]}, "lr milestones 5"),
    ({"nesterov": True}, "Nesterov on"),
    ({"augment": True}, "augmentation on"),
    ({"norm_momentum": 0.9}, "norm momentum 0.9"),
    ({"warmup_steps": 0}, "warm-up 0 steps"),
    ({"classes_per_batch": 2}, "2 classes/batch"),
    ({"train_size": 45000, "val_size": 5000}, None),  # the full data
    ({"val_from": "train", "val_size": 1000},
     "1000 held-out validation images"),
    ({"val_from": "test", "train_size": 50000, "val_size": 10000},
     "validation on all test images (as in 2017)"),
    ({"virtual_batch_size": 32}, "virtual batch 32"),
    ({"devices": 2}, "2 devices"),
])
def test_title_names_a_departure(changes, text):
    line = report.describe_runs([run("a", **changes)])[0]
    if text is None:
        assert line == "protocol seed as specified, on the full data set"
    else:
        assert line == f"protocol seed, except: {text}"


def test_title_compares_with_the_named_protocol():
    wrn = {**dataclasses.asdict(PROTOCOLS["wrn"]), "protocol": "wrn"}
    wrn["lr_milestones"] = list(wrn["lr_milestones"])
    assert report.describe_runs([run("a", **wrn)])[0] == (
        "protocol wrn as specified, on the full data set")
    assert report.describe_runs([run("a", **dict(wrn, epochs=2))])[0] == (
        "protocol wrn, except: 2 epochs")
    assert "'nope' unknown" in report.describe_runs([run("a",
                                                       protocol="nope")])[0]


def test_title_of_a_schedule_in_fractions_omits_its_steps():
    line = report.describe_runs([run("a", renorm_schedule=[0.25, 0.5, 0.75],
                                   warmup_steps=8, r_max_steps=23,
                                   d_max_steps=15)])[0]
    assert line == ("protocol seed, except: renorm schedule 0.25,0.5,0.75 "
                    "of the steps")


def test_title_says_what_differs_between_groups():
    runs = [run("a", batch_size=4, norm_momentum=0.9, epochs=3),
            run("b", batch_size=128, norm_momentum=0.6, epochs=3,
                device="GPU"),
            run("c", batch_size=128, norm_momentum=0.6, epochs=3,
                classes_per_batch=2)]
    lines = report.describe_runs(runs)
    assert lines[0] == "protocol seed, except: 3 epochs"
    assert lines[1] == ("by group: batch size 4, 128; sampling i.i.d., 2 "
                        "classes/batch; norm momentum 0.6, 0.9")
    assert lines[2] == "on 2 devices/backends, by group"


def test_settings_a_norm_does_not_use_neither_split_nor_label_it():
    """batchnorm ignores the renorm bounds and schedule, keras-renorm the
    schedule: runs that differ only there are repeats; the renorm groups
    that differ there are each compared with the one batchnorm group."""
    bn = [run("bn0", norm="batchnorm", warmup_steps=50),
          run("bn1", norm="batchnorm", warmup_steps=5000, seed=1, r_max=2.0)]
    kr = [run("kr0", norm="keras-renorm", warmup_steps=50),
          run("kr1", norm="keras-renorm", warmup_steps=5000, seed=1)]
    brn = [run("r50", warmup_steps=50), run("r5000", warmup_steps=5000)]
    groups = histories.group_runs(bn + kr + brn)
    assert [(g.norm, len(g.runs)) for g in groups] == [
        ("batchnorm", 2), ("renorm", 1), ("renorm", 1), ("keras-renorm", 2)]
    labels = [g.label for g in groups]
    assert labels == ["batchnorm", "renorm, warmup_steps=50",
                      "renorm, warmup_steps=5000", "keras-renorm"]
    assert all(r is not None for r in curves_study.ratios_to_baseline(groups))
    # A bound that keras-renorm uses still splits it.
    assert len(histories.group_runs([run("a", norm="keras-renorm"),
                                     run("b", norm="keras-renorm", seed=1,
                                         r_max=2.0)])) == 2


def test_tracking_corrections_neither_splits_nor_labels_norms_without():
    """train.py tracks corrections for renorm alone: batchnorm's False
    against renorm's True is no setting that tells groups apart, and
    renorm is compared with batchnorm (ratios, the microbatch study)."""
    runs = [run("bn", norm="batchnorm", track_corrections=False,
                virtual_batch_size=4, sampling="pairs"),
            run("brn", track_corrections=True, virtual_batch_size=4,
                sampling="pairs")]
    groups = histories.group_runs(runs)
    assert [g.label for g in groups] == ["batchnorm", "renorm"]
    assert curves_study.ratios_to_baseline(groups) == [1.0, 1.0]
    assert [p.rest for p in microbatch_study.micro_points(runs)] == [(), ()]
