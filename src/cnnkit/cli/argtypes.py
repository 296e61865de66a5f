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
fraction = _number(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
