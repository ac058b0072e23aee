"""DimapError, the exception every refusal of bad input raises, and the checks and the message
shortening every public entry shares. A leaf: imports nothing of ours."""

from __future__ import annotations

import math


class DimapError(ValueError):
    """Bad input: the message says what is wrong and what to do, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, whatever a wrapped library said


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


def check_model_name(name) -> str:
    """A timm model name that exists; a typo gets the closest names."""
    import difflib

    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        if isinstance(name, str) and "." in name:
            raise DimapError(f"{name!r} is neither a checkpoint file nor a timm model name: check the path or the name")
        close = difflib.get_close_matches(str(name), timm.list_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise DimapError(f"unknown model name {name!r}{hint}: see timm.list_models('swin*')")
    return name


def short_reason(exc: BaseException, limit: int = 100, sentence: bool = True) -> str:
    """What went wrong in a library's exception, short enough for one line of a DimapError: an
    OSError's strerror, else its message's first sentence (``sentence``), cut at ``limit``."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split()) or type(exc).__name__
    if sentence:
        text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[:limit - 3] + "..."
