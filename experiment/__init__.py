"""The CIFAR-10 experiment behind train.py, sweep.py, plot.py and
benchmarks/: each concern in one module (ARCHITECTURE.md has the map).
Nothing here imports Keras at import time (the flags are checked before
Keras starts): functions import it where they use it.

  cli            usage errors, the parser that raises them, flag types
  protocols      the protocols, norms and run settings; schedule and resume
                 rules
  flags          train.py's flags -> a run's configuration
  cifar10        reading and checking the official CIFAR-10 files
  preprocessing  subsets, channel statistics, normalization, augmentation,
                 and the arrays of a run
  sampling       batch plans (i.i.d., K classes per batch) and host batches
  device_data    the same batches made on the device (--input device)
  network        the run's model and optimizer
  runtime        backend, device, versions; jit / input /
                 steps-per-execution resolution; Keras session; epoch clock
  runfiles       a run's files: paths, the one atomic writer, CSV, JSON,
                 state, the repair on resume, README blocks
  hosts          several processes on one run: shares, the writer
  runlock        one writer per run (a lock file)
  signals        SIGINT / SIGTERM during a run
  console        what train.py prints
  startup        TensorFlow's C++ start-up lines kept off stderr
  histories      the histories read for analysis: runs, groups, a study's
                 points (plot.py)
  report         what plot.py's studies share: titles, colours, tables,
                 t-intervals
  curves_study   curves, seconds per epoch, timing.md's table
  sweep_study    the batch-size / sampling sweep's figures and tables
  microbatch_study  the microbatch study's figure and tables
  gap_study      the corrections study: corrections figure, gap tables
"""
