"""The one exception type users catch, and the checks every public entry shares."""

from __future__ import annotations

import math

METHODS = ("dimap", "global", "uniform")


class DimapError(ValueError):
    """Bad input: the message says what is wrong and what to do, on one line."""


def check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) and not hasattr(ratio, "__float__"):
        raise DimapError(f"ratio must be a number in [0, 1), got {ratio!r}")
    value = float(ratio)
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise DimapError(f"ratio must be in [0, 1), got {ratio!r}: it is the fraction of weights to remove")
    return value


def check_choice(kind: str, value, choices) -> str:
    if value not in choices:
        raise DimapError(f"unknown {kind} {value!r}: choose one of {', '.join(choices)}")
    return value
