"""Hyperparameter checks shared by every optimizer: a bad value raises ``ValueError`` naming the
argument and its allowed range, so a typo never turns into silent damage."""

from __future__ import annotations

import math
from numbers import Integral, Real

NONFINITE_POLICIES = ("error", "skip")  # what an optimizer does with a non-finite gradient or loss


def check_real(name: str, value, low: float, high: float = math.inf, *, low_open: bool = False,
               high_open: bool = True) -> float:
    """``value`` as a float if it is a finite real in the interval, else ``ValueError``."""
    upper = "inf)" if high == math.inf else f"{high}{')' if high_open else ']'}"
    interval = f"{'(' if low_open else '['}{low}, {upper}"
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    v = float(value)
    if v < low or (low_open and v == low) or v > high or (high_open and v == high):
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """``value`` as an int if it is an integer in ``[low, high]``, else ``ValueError``."""
    interval = f"[{low}, {high}]" if high is not None else f"[{low}, inf)"
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer in {interval}, got {value!r}")
    v = int(value)
    if v < low or (high is not None and v > high):
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


def check_choice(name: str, value, choices) -> str:
    """``value`` if it is one of ``choices`` (any collection of names), else ``ValueError``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` if it is exactly True or False (not 0/1 or a string), else ``ValueError``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value
