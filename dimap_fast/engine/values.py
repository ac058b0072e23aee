"""What a user chooses: the pruning pattern and the method, small values validated once.

    Pattern.unstructured()   a unit is one weight (the paper)
    Pattern.block(32)        a unit is a BxB tile of a weight matrix, B in TILE_SIZES
    Pattern.channel()        a unit is an MLP hidden neuron or an attention head
    Pattern.nm(2, 4)         n of every m consecutive input weights stay (the engine implements 2:4)
    Method.DIMAP, Method.GLOBAL, Method.UNIFORM

``Pattern.parse`` and ``Method.parse`` read the spellings of the command line and of the keyword
arguments ("block32", "block", "2:4", "dimap"). A value equals its canonical spelling,
``str(value)`` ("block32", "2:4", "dimap"), and hashes like it, so a user may pass either.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

from ..errors import DimapError
from ..kernels.sparse_linear import TILE_SIZES  # noqa: F401 - one home: the kernel's tile sides

DEFAULT_BLOCK = 32
PATTERNS = ("unstructured", "block", "channel", "2:4")  # the names the command line offers
_KINDS = ("unstructured", "block", "channel", "n:m")


class Method(str, enum.Enum):
    """How the cut is shared: per module by Eq. 10 scores (dimap), one magnitude threshold over all
    prunable weights (global), or the same share of every layer (uniform)."""

    DIMAP = "dimap"
    GLOBAL = "global"
    UNIFORM = "uniform"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value) -> "Method":
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value in METHODS:
            return cls(value)
        raise DimapError(f"unknown method {value!r}: choose one of {', '.join(METHODS)}")


METHODS = tuple(m.value for m in Method)


@dataclass(frozen=True, eq=False)
class Pattern:
    """What one pruning unit is; build it with the constructors below or ``Pattern.parse``."""

    kind: str
    block_size: int | None = None
    n: int | None = None
    m: int | None = None

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise DimapError(f"unknown pattern kind {self.kind!r}: use Pattern.unstructured(), Pattern.block(B), "
                             "Pattern.channel() or Pattern.nm(n, m)")
        if self.kind == "block":
            if not _is_int(self.block_size) or self.block_size not in TILE_SIZES:
                raise DimapError(f"block_size must be one of {TILE_SIZES}, got {self.block_size!r}")
        elif self.block_size is not None:
            raise DimapError(f"a block size belongs to the block pattern, not to {self.name!r}: "
                             f"use Pattern.block({self.block_size!r}) or drop the block size")
        if self.kind == "n:m":
            if not (_is_int(self.n) and _is_int(self.m) and 0 < self.n < self.m):
                raise DimapError(f"an n:m pattern keeps n of every m weights, 0 < n < m: got {self.n!r}:{self.m!r}")
        elif self.n is not None or self.m is not None:
            raise DimapError(f"n and m belong to the n:m pattern, not to {self.kind!r}: use Pattern.nm(n, m)")

    @classmethod
    def unstructured(cls) -> "Pattern":
        return cls("unstructured")

    @classmethod
    def block(cls, size: int = DEFAULT_BLOCK) -> "Pattern":
        return cls("block", block_size=size)

    @classmethod
    def channel(cls) -> "Pattern":
        return cls("channel")

    @classmethod
    def nm(cls, n: int, m: int) -> "Pattern":
        return cls("n:m", n=n, m=m)

    @classmethod
    def parse(cls, text) -> "Pattern":
        """"unstructured", "channel", "block" (B=32), "block16", "2:4"; a Pattern is returned as it is."""
        if isinstance(text, cls):
            return text
        if isinstance(text, str):
            if text in ("unstructured", "channel"):
                return cls(text)
            if text == "block":
                return cls.block()
            sized = re.fullmatch(r"block(\d+)", text)
            if sized:
                return cls.block(int(sized.group(1)))
            nm = re.fullmatch(r"(\d+):(\d+)", text)
            if nm:
                return cls.nm(int(nm.group(1)), int(nm.group(2)))
        raise DimapError(f"unknown pattern {text!r}: choose one of {', '.join(PATTERNS)}")

    @property
    def name(self) -> str:
        """The pattern's name without the block size: "block", "2:4" (the ``pattern=`` keyword's spelling)."""
        return f"{self.n}:{self.m}" if self.kind == "n:m" else self.kind

    @property
    def fraction(self) -> float | None:
        """The share of weights an n:m pattern always removes; None for thresholded patterns."""
        return (self.m - self.n) / self.m if self.kind == "n:m" else None

    def metadata(self) -> dict[str, str]:
        """What a pruned checkpoint records: the pattern's name, and for block the tile size."""
        return {"pattern": self.name, **({"block_size": str(self.block_size)} if self.kind == "block" else {})}

    def __str__(self) -> str:
        return f"block{self.block_size}" if self.kind == "block" else self.name

    def __repr__(self) -> str:
        args = {"block": f"{self.block_size}", "n:m": f"{self.n}, {self.m}"}.get(self.kind, "")
        return f"Pattern.{'nm' if self.kind == 'n:m' else self.kind}({args})"

    def _key(self) -> tuple:
        return (self.kind, self.block_size, self.n, self.m)

    def __eq__(self, other) -> bool:
        if isinstance(other, Pattern):
            return self._key() == other._key()
        if isinstance(other, str):
            return str(self) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(str(self))  # equal to its spelling, so hashed like it


def as_pattern(pattern, block_size=None) -> Pattern:
    """A Pattern from a value, or from a (pattern name, block_size) pair as the keywords take them."""
    if isinstance(pattern, Pattern):
        if block_size is not None:
            raise DimapError(f"{pattern!r} carries its own block size: drop block_size={block_size!r}")
        return pattern
    value = Pattern.parse(pattern)
    if block_size is None:
        return value
    if value.kind == "block":
        if pattern != "block" and block_size != value.block_size:
            raise DimapError(f"pattern {pattern!r} and block_size={block_size!r} disagree: give the size once")
        return Pattern.block(block_size)
    raise DimapError(f"block_size={block_size!r} applies to pattern 'block' only, not {value.name!r}: drop it")


def supported(pattern: Pattern) -> Pattern:
    """The pattern, if the engine implements it; n:m is 2:4 only for now."""
    if pattern.kind == "n:m" and (pattern.n, pattern.m) != (2, 4):
        raise DimapError(f"pattern {pattern.name!r} is not implemented: only 2:4 is (Pattern.nm(2, 4))")
    return pattern


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_reduction(reduction) -> float:
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) and not hasattr(reduction, "__float__"):
        raise DimapError(f"a FLOPs reduction must be a number in [0, 1), got {reduction!r}")
    value = float(reduction)
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise DimapError(f"a FLOPs reduction must be in [0, 1), got {reduction!r}: it is the fraction of the dense FLOPs to remove")
    return value


@dataclass(frozen=True)
class FlopsReduction:
    """A budget instead of a ratio: remove at least ``reduction`` of the dense FLOPs, counted as
    ``report`` counts them at ``input_size`` (default the model's). ``prune_`` finds the smallest
    ratio that does (``Plan.ratio_for_flops``)."""

    reduction: float
    input_size: int | tuple[int, int] | None = None

    def __post_init__(self):
        object.__setattr__(self, "reduction", check_reduction(self.reduction))
