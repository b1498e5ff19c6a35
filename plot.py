#!/usr/bin/env python3
"""Plot and tabulate the training histories written by train.py.

Writes, in PLOTS_DIR, timing.md (also printed) and the figures the runs
have; docs/experiment.md#plotpy says what each shows.
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
# Each gives its section of timing.md (`tables`) and its `figures`.
STUDIES = (curves_study, sweep_study, microbatch_study, gap_study)


def parse_args(argv):
    parser = script_parser(PROG, __doc__)
    parser.add_argument("runs", nargs="*", metavar="RUN", help=(
        "a run's name or .csv (default: every run in --history-dir)"))
    parser.add_argument("--history-dir", type=Path, default=Path("history"),
                        help="the histories (default: %(default)s)")
    parser.add_argument("--plots-dir", type=Path, default=Path("plots"),
                        help="for figures, timing.md (default: %(default)s)")
    parser.add_argument("--readme", type=Path, metavar="FILE", help=(
        f"also put the table into FILE between {README_BEGIN} and {README_END}"))
    return parser.parse_args(argv)


def main(argv=None):
    try:
        args = parse_args(argv)
    except UsageError as problem:
        return fail(PROG, problem, 2)
    runs = load_runs(history_paths(args.runs, args.history_dir))
    if not runs:
        return fail(PROG, "no usable history " + (
            "among the named runs" if args.runs else f"in {args.history_dir}"),
            1)
    groups = group_runs(runs)
    report = "".join(study.tables(runs, groups) for study in STUDIES)
    try:
        args.plots_dir.mkdir(parents=True, exist_ok=True)
        sns.set_theme(style="whitegrid", context="notebook")
        for study in STUDIES:
            for name, figure in study.figures(runs, groups):
                save_figure(figure, args.plots_dir / name)
        runfiles.write_file(args.plots_dir / "timing.md", report.encode())
        if args.readme:  # ValueError: the file lacks the markers
            runfiles.replace_block(args.readme, README_BEGIN, README_END,
                                   report.split("\n\n", 1)[1])
    except (OSError, ValueError, runfiles.WriteError) as problem:
        return fail(PROG, problem, 1)
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
