# The project's two commands (see README.md):
#   make run    set up .venv, train BN and BRN briefly on CIFAR-10 (CPU), plot
#   make test   set up .venv, run the tests on every Keras backend
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BACKENDS ?= tensorflow jax torch
# CIFAR-10 in the official python layout; the copy beside this checkout
# (../shared/data) is used when CIFAR10_DIR is not set.
ifeq ($(origin CIFAR10_DIR), undefined)
  ifneq ($(wildcard ../shared/data/cifar-10-batches-py/data_batch_1),)
    export CIFAR10_DIR := $(abspath ../shared/data/cifar-10-batches-py)
  endif
endif

.PHONY: setup test run

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

test: setup
	@set -e; for backend in $(BACKENDS); do \
	  echo "=== pytest, KERAS_BACKEND=$$backend"; \
	  KERAS_BACKEND=$$backend $(BIN)/python -m pytest $(PYTEST_ARGS); \
	done
