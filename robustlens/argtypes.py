"""argparse ``type=`` validators shared by every subcommand: bad option values are refused before any work
starts (exit status 2, the option named by argparse), never discovered minutes into a run."""

from __future__ import annotations

import argparse
import math


def _int_at_least(text: str, minimum: int, expected: str, *, below: str | None = None) -> int:
    """``text`` as an integer ``>= minimum``; the error says ``expected {expected}`` (``{below}`` when the
    integer is too small and ``below`` is given)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {below or expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer ≥ 1 (``--workers``, ``--max-pixels``, thread and sample counts)."""
    return _int_at_least(text, 1, "a positive integer", below="a positive integer (1 or more)")


def non_negative_int(text: str) -> int:
    """An integer ≥ 0 (counts where 0 means "skip")."""
    return _int_at_least(text, 0, "an integer ≥ 0")


def finite_float(text: str) -> float:
    """A finite number: NaN and infinity are refused (they would poison every result computed from them)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def unit_fraction(text: str) -> float:
    """A finite number in ``[0, 1)`` (``--sum-tolerance``)."""
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value
