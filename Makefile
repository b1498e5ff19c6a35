# The project's two commands (see README.md):
#   make run    set up .venv, train BN and BRN briefly on CIFAR-10 (CPU), plot
#   make test   set up .venv, ruff check, run the tests on every Keras backend
# and the reference runs behind README's results:
#   make reference-cpu   WRN-16-2, 3200 training images, 10 epochs (CPU)
#   make reference-gpu   WRN-16-4, all 50000 images, 100 epochs (GPU, JAX:
#                        benchmarks/reference_gpu.py)
#   make sweep-cpu       BN / BRN / Keras renorm over batch sizes and i.i.d. /
#                        non-i.i.d. batches, reduced (sweep.py --preset cpu)
#   make sweep-gpu       the same at full size (sweep.py --preset gpu, JAX)
#   make study-cpu       the paper's design: batch 128, BN / BRN normalized in
#                        virtual batches of V, i.i.d. / pairs, several seeds
#                        (sweep.py --study microbatch --preset cpu)
#   make study-gpu       the same at full size (--preset gpu, JAX)
# and the benchmarks behind the speed table (docs/speed.md):
#   make bench           benchmarks/bench.py on each backend in BACKENDS
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

# make run: WRN-16-2 on 1500 training images for 3 epochs of 12 steps, each
# norm, validated on 500 other training images held out (5-10 minutes on 2
# CPU cores); the renorm schedule scaled to 36 steps (plain BN for the first
# epoch, then r_max -> 3 and d_max -> 5), moving averages with momentum 0.75
# (a time constant of 4 steps) so that they settle within the 12-step
# warm-up (3 time constants; train.py warns below that).
QUICK_DIR ?= runs/quick
QUICK_FLAGS ?= --depth 16 --width 2 --train-size 1500 --val-size 500 \
  --epochs 3 --norm-momentum 0.75 --warmup-steps 12 --d-max-steps 24 \
  --r-max-steps 36
# make reference-cpu: the `seed` protocol (Adam, batch 128, no augmentation)
# with WRN-16-2 on a stratified 3200-image subset for 10 epochs (250 steps),
# validated on 1000 other training images held out: about 10 minutes per
# norm on 2 CPU cores. Fitted to the 250 steps: moving averages with
# momentum 0.9 (a time constant of 10 steps; Keras's 0.99 would need 100,
# longer than the warm-up could be) and the renorm schedule as fractions of
# the run: plain BN for the first 50 steps (5 time constants), d_max reached
# at step 125, r_max at 200. (The paper scaled would be 32/160/256 steps:
# a warm-up shorter than the averages' settling, which made the loss spike
# in this run's earlier version.)
CPU_FLAGS ?= --depth 16 --width 2 --train-size 3200 --val-size 1000 \
  --epochs 10 --norm-momentum 0.9 --renorm-schedule 0.2,0.5,0.8
NORMS ?= batchnorm renorm
export KERAS_BACKEND ?= tensorflow
# Each pass ends with its ten slowest tests: where the suite's time goes.
PYTEST_ARGS ?= --durations=10

.PHONY: setup test run reference-cpu reference-gpu sweep-cpu sweep-gpu \
  study-cpu study-gpu bench

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	# tf.keras (Keras 2), the benchmarks' outside anchor; --no-deps, or pip
	# would add the full tensorflow package beside tensorflow-cpu.
	$(BIN)/python -m pip install --quiet --no-deps tf-keras==2.21.0
	touch $@

test: setup
	$(BIN)/ruff check .
	@set -e; for backend in $(BACKENDS); do \
	  echo "=== pytest, KERAS_BACKEND=$$backend"; \
	  KERAS_BACKEND=$$backend $(BIN)/python -m pytest $(PYTEST_ARGS); \
	done

run: setup
	@set -e; for norm in $(NORMS); do \
	  $(BIN)/python train.py --norm $$norm --name quick-$$norm $(QUICK_FLAGS) \
	    --history-dir $(QUICK_DIR)/history --weights-dir $(QUICK_DIR)/weights \
	    --overwrite; \
	done
	$(BIN)/python plot.py --history-dir $(QUICK_DIR)/history \
	  --plots-dir $(QUICK_DIR)/plots

reference-cpu: setup
	@set -e; for norm in $(NORMS); do \
	  $(BIN)/python train.py --norm $$norm --name $$norm-seed-cpu \
	    $(CPU_FLAGS) --overwrite; \
	done
	$(BIN)/python plot.py --readme README.md

# make reference-gpu: benchmarks/reference_gpu.py with the Python that has a
# CUDA build of JAX and Keras (GPU_PYTHON; not .venv, whose requirements pin
# the CPU build): both norms, 100 epochs, then bench.py, plot.py after each
# run, into history/, plots/ and benchmarks/results/ below gpu-<GPU name>.
# In a fixed window: GPU_ARGS="--time-budget 540 --output-dir OUT" starts
# only what fits and copies each finished run into OUT (docs/gpu.md).
GPU_PYTHON ?= python3
GPU_ARGS ?=
reference-gpu:
	KERAS_BACKEND=jax $(GPU_PYTHON) benchmarks/reference_gpu.py $(GPU_ARGS)

sweep-cpu: setup
	$(BIN)/python sweep.py --preset cpu

sweep-gpu: setup
	KERAS_BACKEND=jax $(BIN)/python sweep.py --preset gpu

# make study-cpu: 50 runs, about 80 minutes on 2 CPU cores (docs/sweep.md);
# resumable: the same command continues after an interruption.
study-cpu: setup
	$(BIN)/python sweep.py --study microbatch --preset cpu

study-gpu: setup
	KERAS_BACKEND=jax $(BIN)/python sweep.py --study microbatch --preset gpu

# make bench: layer and model level, then the input pipeline and jit_compile
# on/off, for each backend, then the speed table in docs/speed.md
# (benchmarks/results).
BENCH_ARGS ?=
bench: setup
	@set -e; for backend in $(BACKENDS); do \
	  $(BIN)/python benchmarks/bench.py --backend $$backend \
	    --level layer model input jit $(BENCH_ARGS); \
	done
	$(BIN)/python benchmarks/bench.py --summary --readme docs/speed.md
