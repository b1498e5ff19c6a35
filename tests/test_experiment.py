"""The experiment package's own rules: one source for each default, and
imports that run one way (scripts import the package, never each other)."""

import ast
import subprocess
import sys
import dataclasses
import inspect
from pathlib import Path

import pytest

from batch_renorm import BatchRenormalization
from experiment import cli
from experiment import protocols
from experiment import runfiles
from models.norms import SCHEDULE_ARGS
from models.norms import make_norm

pytestmark = pytest.mark.backend_independent

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("train", "sweep", "plot")


def test_protocols_use_the_layers_schedule():
    """The seed protocol states the paper's schedule; it is also the
    layer's default (and so make_norm's); wrn shares it."""
    layer = inspect.signature(BatchRenormalization).parameters
    factory = inspect.signature(make_norm).parameters
    for protocol in protocols.PROTOCOLS.values():
        for name in SCHEDULE_ARGS:
            assert getattr(protocol, name) == layer[name].default, name
            assert factory[name].default == layer[name].default, name


def test_wrn_differs_from_seed_only_where_it_says():
    seed, wrn = protocols.PROTOCOLS["seed"], protocols.PROTOCOLS["wrn"]
    differing = {f.name for f in dataclasses.fields(seed)
                 if getattr(seed, f.name) != getattr(wrn, f.name)}
    assert differing == {"epochs", "optimizer", "lr", "lr_milestones",
                         "lr_gamma", "sgd_momentum", "nesterov",
                         "weight_decay", "augment", "norm_momentum",
                         "norm_epsilon"}


def imported_modules(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(
    [ROOT / f"{name}.py" for name in SCRIPTS]
    + list((ROOT / "benchmarks").glob("*.py"))
    + list((ROOT / "experiment").glob("*.py"))
    + list((ROOT / "models").glob("*.py"))), ids=lambda p: p.name)
def test_nothing_imports_a_script(path):
    assert not imported_modules(path) & set(SCRIPTS)


@pytest.mark.parametrize("path", sorted((ROOT / "models").glob("*.py"))
                         + [ROOT / "batch_renorm.py"], ids=lambda p: p.name)
def test_the_library_does_not_import_the_experiment(path):
    assert "experiment" not in imported_modules(path)


def test_the_experiment_and_plotting_start_without_keras():
    """train.py checks its flags, and plot.py draws, before Keras starts
    (TensorFlow's start-up takes seconds): no module of the package, nor
    plot.py, imports it at import time."""
    modules = [f"experiment.{p.stem}" for p in
               sorted((ROOT / "experiment").glob("*.py"))] + ["plot", "train"]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('keras', 'tensorflow', 'jax', 'torch')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                            capture_output=True, text=True, check=False,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("parse, text, words", [
    (cli.positive_int, "0", "must be a positive integer: 0"),
    (cli.nonnegative_int, "-1", "must be an integer >= 0: -1"),
    (cli.positive_float, "nan", "must be a positive number: nan"),
    (cli.positive_float, "inf", "must be a positive number: inf"),
    (cli.nonnegative_float, "-0.5", "must be a number >= 0: -0.5"),
    (cli.fraction, "1", "must be in [0, 1): 1"),
    (cli.at_least_one, "0.9", "must be a number >= 1: 0.9"),
    (cli.steps_or_auto, "x", "must be a positive integer or auto: x"),
])
def test_flag_types_refuse_with_the_rule(parse, text, words):
    with pytest.raises(Exception, match=words.replace("[", r"\[")
                       .replace("(", r"\(").replace(")", r"\)")):
        parse(text)


def test_flag_types_accept():
    assert cli.positive_int("3") == 3 and cli.nonnegative_int("0") == 0
    assert cli.positive_float("1e-3") == 1e-3 and cli.fraction("0") == 0
    assert cli.at_least_one("1") == 1 and cli.steps_or_auto("auto") == "auto"
    assert cli.positive_int.__name__ == "positive_int"  # argparse's message


def test_replace_block(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("head\n<!-- b -->\nold\n<!-- e -->\ntail\n")
    runfiles.replace_block(path, "<!-- b -->", "<!-- e -->", "new\n")
    assert path.read_text() == "head\n<!-- b -->\nnew\n<!-- e -->\ntail\n"
    path.write_text("no block\n")
    with pytest.raises(ValueError, match="has no <!-- b -->"):
        runfiles.replace_block(path, "<!-- b -->", "<!-- e -->", "new\n")
    assert path.read_text() == "no block\n"
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


def test_read_rows_reads_as_dict_reader(tmp_path):
    import csv

    path = tmp_path / "h.csv"
    path.write_text("epoch,loss\n1,0.5\n\n2\n3,0.1,extra\n,0.2\n")
    with open(path, newline="") as file:
        expected = [r for r in csv.DictReader(file) if r.get("epoch")]
    assert runfiles.read_rows(path) == expected
    assert runfiles.read_rows(tmp_path / "missing.csv") == []


def test_the_package_description_stands_alone():
    """The package's long description (pyproject's readme) has no relative
    links or images, which a package index cannot resolve; the licence is
    there."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    text = (ROOT / project["readme"]).read_text()
    targets = re.findall(r"\]\(([^)]+)\)", text)
    assert targets and all(t.startswith("https://") for t in targets)


def test_configured_backend_follows_keras_rule(tmp_path, monkeypatch):
    from experiment import runtime

    monkeypatch.setenv("KERAS_BACKEND", "torch")
    assert runtime.configured_backend() == "torch"
    monkeypatch.delenv("KERAS_BACKEND")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert runtime.configured_backend() == "tensorflow"  # Keras's default
    (tmp_path / "keras.json").write_text('{"backend": "jax"}')
    assert runtime.configured_backend() == "jax"
