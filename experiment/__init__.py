"""The CIFAR-10 experiment behind train.py, sweep.py, plot.py and
benchmarks/, one module per concern (ARCHITECTURE.md has the map). No
module imports Keras at import time (the flags are checked before Keras
starts): functions import it where they use it."""
