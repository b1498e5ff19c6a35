"""What the scripts' command lines share: one-line usage errors, the argparse
parser that raises them, and the flag types, made by one factory."""

import argparse
import math
import sys


class UsageError(Exception):
    """Bad flags or arguments: one line on stderr, exit 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (a UsageError naming the
    script's --help), not the usage block."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def script_parser(prog, doc):
    """A Parser for the script `prog` whose --help is its docstring `doc`:
    the first paragraph before the flags, the rest after, as written."""
    description, _, epilog = doc.partition("\n\n")
    return Parser(prog=prog, description=description, epilog=epilog,
                  formatter_class=argparse.RawDescriptionHelpFormatter)


def fail(prog, message, code):
    """Prints `PROG: error: MESSAGE` on stderr; returns `code`."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def number(name, requirement, kind, low, high=math.inf, *, low_open=False,
           word=None):
    """An argparse type named `name`: `kind(text)` in [low, high) ((low,
    high) with `low_open`), or the string `word`; else "must be REQUIREMENT:
    TEXT" (argparse names the type where `kind` fails and there is no word)."""

    def parse(text):
        if text == word:
            return text
        try:
            value = kind(text)
        except ValueError:
            if word is None:
                raise
            value = math.nan
        inside = not math.isnan(value) and (
            value > low if low_open else value >= low) and value < high
        if not inside:
            raise argparse.ArgumentTypeError(f"must be {requirement}: {text}")
        return value

    parse.__name__ = name
    return parse


positive_int = number("positive_int", "a positive integer", int, 1)
nonnegative_int = number("nonnegative_int", "an integer >= 0", int, 0)
positive_float = number("positive_float", "a positive number", float, 0,
                        low_open=True)
nonnegative_float = number("nonnegative_float", "a number >= 0", float, 0)
fraction = number("fraction", "in [0, 1)", float, 0, 1)
at_least_one = number("at_least_one", "a number >= 1", float, 1)
steps_or_auto = number("steps_or_auto", "a positive integer or auto", int, 1,
                       word="auto")
devices_or_all = number("devices_or_all", "a positive integer or all", int,
                        1, word="all")


def milestones(text):
    """Increasing positive epochs, comma-separated (empty: none)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = None
    if values is None or list(values) != sorted(set(values)) or any(
            v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            "must be increasing positive epochs separated by commas, like "
            f"60,120,160 (or an empty string for none): {text!r}")
    return values


def schedule_fractions(text):
    """The renorm schedule W,D,R as fractions of a run's steps."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0 <= v < math.inf for v in values) or any(
            0 < v < values[0] for v in values[1:]):
        raise argparse.ArgumentTypeError(
            "must be three fractions W,D,R of the run's steps (end of the "
            "warm-up, d_max reached, r_max reached), each >= 0, with D and R "
            f"0 or >= W, like 0.04,0.19,0.31: {text!r}")
    return values


def wrn_depth(text):
    """A Wide ResNet depth, 6N + 4."""
    value = int(text)
    if value < 10 or (value - 4) % 6:
        raise argparse.ArgumentTypeError(
            f"must be 6N + 4 with N >= 1 (10, 16, 22, 28, 40, ...): {text}")
    return value


def run_name(text):
    """A run name: a file name of letters, digits and ._-+=."""
    if not text or text.startswith(".") or any(
            not (c.isalnum() or c in "._-+=") for c in text):
        raise argparse.ArgumentTypeError(
            f"must be a file name of letters, digits and ._-+=: {text!r}")
    return text
