"""argparse types for the benchmarks' numeric options: a value out of range is refused with
argparse's one-line usage error, before any photo is made or process started."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def at_least(low: int) -> Callable[[str], int]:
    """An integer type refusing values under `low` (1 for counts, 0 where 0 means a default)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def _real(text: str, wanted: str, ok: Callable[[float], bool]) -> float:
    """float(text) if finite and ok: "nan" or "inf" seconds would never end a timing loop."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """Durations and thresholds: seconds, minutes, hours, megabytes."""
    return _real(text, "a number > 0", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    """Where 0 is meaningful: no warm-up, an unlimited request rate."""
    return _real(text, "a number >= 0", lambda v: v >= 0)


def share(text: str) -> float:
    """A share of a catalog, in (0, 1]: 0.01 is 1%, and more than all of it means nothing."""
    return _real(text, "a share in (0, 1]", lambda v: 0 < v <= 1)


def sizes(text: str) -> list[int]:
    """Comma-separated positive integers such as "192,160,128" (sides, catalog sizes)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas, got {text!r}"
        )
    return values


def sizes_or_none(text: str) -> list[int]:
    """As sizes, or "" for none: a part of the benchmark left out."""
    return sizes(text) if text else []
