"""Shared pytest setup: the tests folder on sys.path, and small fixtures."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def restore_dtype_policy():
    """Restores the global Keras dtype policy after the test."""
    import keras

    policy = keras.config.dtype_policy()
    try:
        yield
    finally:
        keras.config.set_dtype_policy(policy)
