#!/usr/bin/env python3
"""Plot and tabulate the training histories written by train.py.

Each run is a pair `<run>.csv` (one row per epoch) and `<run>.json` (its
configuration); runs that differ only in their seed (and name, timings,
provenance) are repeats of one group. Writes, in PLOTS, timing.md (a row
per group: accuracy, s/epoch, its ratio to batchnorm, the code the runs
ran; also printed; the studies' tables below) and the figures the runs
have: curves.png, seconds_per_epoch.png; accuracy_vs_batch_size.png and
non_iid.png (sweep.py); microbatch.png (sweep.py --study microbatch);
NAME.corrections.png (train.py --track-corrections).

Titles state every setting that departs from the runs' protocol, and the
device. Groups of mixed or unknown code are flagged; a partial or malformed
history is skipped with a warning naming it.

With --readme FILE, the table also replaces what FILE holds between the
lines `<!-- timing.md begins -->` and `<!-- timing.md ends -->`.
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import seaborn as sns

from experiment import (
    curves_study, gap_study, microbatch_study, runfiles, sweep_study)
from experiment.cli import UsageError, fail, script_parser
from experiment.histories import group_runs, history_paths, load_runs
from experiment.report import save_figure

PROG = "plot.py"
README_BEGIN = "<!-- timing.md begins -->"
README_END = "<!-- timing.md ends -->"
# Each writes its section of timing.md (`tables`) and its `figures`.
STUDIES = (curves_study, sweep_study, microbatch_study, gap_study)


def parse_args(argv):
    parser = script_parser(PROG, __doc__)
    parser.add_argument(
        "runs", nargs="*", metavar="RUN",
        help="runs to include: a name (file stem in --history-dir) or a path "
             "to its .csv; default: every history in --history-dir")
    parser.add_argument("--history-dir", type=Path, default=Path("history"),
                        help="where the histories are (default: %(default)s)")
    parser.add_argument("--plots-dir", type=Path, default=Path("plots"),
                        help="where to write the figures and timing.md "
                             "(default: %(default)s)")
    parser.add_argument("--readme", type=Path, metavar="FILE",
                        help="also put the table into FILE between the "
                             f"lines {README_BEGIN} and {README_END}")
    return parser.parse_args(argv)


def error(message):
    return fail(PROG, message, 1)


def main(argv=None):
    try:
        args = parse_args(argv)
    except UsageError as problem:
        return fail(PROG, problem, 2)
    runs = load_runs(history_paths(args.runs, args.history_dir))
    if not runs:
        return error("no usable history " + (
            "among the named runs" if args.runs else f"in {args.history_dir}"))
    groups = group_runs(runs)
    report = "".join(study.tables(runs, groups) for study in STUDIES)
    try:
        args.plots_dir.mkdir(parents=True, exist_ok=True)
        sns.set_theme(style="whitegrid", context="notebook")
        for study in STUDIES:
            for name, figure in study.figures(runs, groups):
                save_figure(figure, args.plots_dir / name)
        runfiles.write_file(args.plots_dir / "timing.md", report.encode())
    except (OSError, runfiles.WriteError) as problem:
        return error(f"cannot write to {args.plots_dir}: {problem}")
    if args.readme:
        try:
            runfiles.replace_block(args.readme, README_BEGIN, README_END,
                                   report.split("\n\n", 1)[1])
        except (OSError, ValueError, runfiles.WriteError) as problem:
            return error(problem)
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
