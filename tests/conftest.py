"""Shared pytest setup: the tests folder on sys.path, small fixtures, and
the tests that run on one backend only.

A test marked `backend_independent` checks something that does not depend
on the Keras backend (plotting, run files, command-line errors, sampling):
`make test` runs the suite once per backend, and such a test runs in the
pass with KERAS_BACKEND=ONCE_BACKEND only (the one that trains the
tests' tiny networks fastest on a CPU).
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The shared helpers' asserts explain their failures as a test's do.
pytest.register_assert_rewrite("train_runs", "layer_cases")

ONCE_BACKEND = "torch"


def _backend():
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "backend_independent: checks no backend-specific "
        f"behaviour; runs only with KERAS_BACKEND={ONCE_BACKEND}")


def pytest_report_header(config):
    if _backend() != ONCE_BACKEND:
        return (f"backend-independent tests deselected (they run with "
                f"KERAS_BACKEND={ONCE_BACKEND})")
    return None


def pytest_collection_modifyitems(config, items):
    if _backend() == ONCE_BACKEND:
        return
    kept, once = [], []
    for item in items:
        marked = item.get_closest_marker("backend_independent")
        (once if marked else kept).append(item)
    if once:
        config.hook.pytest_deselected(items=once)
        items[:] = kept


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tiny CIFAR-10 folder (10 images of each class per training file, 4
    per class in the test file), shared by every test that reads one."""
    from fake_cifar import write_fake_cifar

    return write_fake_cifar(tmp_path_factory.mktemp("data"), per_class=10,
                            test_per_class=4)


@pytest.fixture
def restore_dtype_policy():
    """Restores the global Keras dtype policy after the test."""
    import keras

    policy = keras.config.dtype_policy()
    try:
        yield
    finally:
        keras.config.set_dtype_policy(policy)
