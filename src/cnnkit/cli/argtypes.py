"""argparse types that check a flag's value when it is parsed: a bad value is one line naming the flag,
before anything starts."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(cast: Callable, ok: Callable, what: str) -> Callable[[str], object]:
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive whole number")
count = _number(int, lambda v: v >= 0, "a whole number >= 0")
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
nonnegative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
# a parameter count such as 5e9: a whole number >= 1 once read as a number
parameter_count = _number(lambda t: int(float(t)) if math.isfinite(float(t)) else -1, lambda v: v >= 1,
                          "a number of parameters >= 1 (e.g. 5e9)")
fraction = _number(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
# seeds are combined with epochs and streams into 64-bit generator seeds (and NumPy takes no negative seed)
seed = _number(int, lambda v: 0 <= v < 2**32, "a whole number in [0, 2^32)")


def interval(spec: str) -> Callable[[str], float]:
    """A number in an interval written as in mathematics: ``interval("(0, 1]")`` takes 0 < v <= 1."""
    lo, hi = (float(v) for v in spec[1:-1].split(","))
    low_ok = (lambda v: v > lo) if spec[0] == "(" else (lambda v: v >= lo)
    high_ok = (lambda v: v < hi) if spec[-1] == ")" else (lambda v: v <= hi)
    return _number(float, lambda v: low_ok(v) and high_ok(v), f"a number in {spec}")


def palette(text: str) -> list[list[int]]:
    """Colour masks' palette, ``r,g,b;r,g,b;...``: colour i is class i."""
    try:
        cols = [[int(v) for v in c.split(",")] for c in text.split(";") if c.strip()]
    except ValueError:
        cols = []
    if not cols or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in cols):
        raise argparse.ArgumentTypeError(f"{text!r} is not 'r,g,b;r,g,b;...' with values 0..255")
    return cols
