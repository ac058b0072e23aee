"""``SparseLinear``: an nn.Linear whose zero BxB tiles are skipped on the GPU.

The dense, zero-filled weight stays the parameter (see derived_linear.py). On CPU the forward is
F.linear on it, never slower than nn.Linear. On the Triton path the kept tiles are packed on first
use and repacked whenever the weight changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.values import TILE_SIZES
from .backend import compute_dtype, kernels
from .derived_linear import DerivedLinear

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the block-sparse kernel takes


class SparseLinear(DerivedLinear):
    """nn.Linear with block-structured zeros; ``block`` is the tile side (16, 32 or 64)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block: int = 32,
                 device=None, dtype=None):
        if block not in TILE_SIZES:
            raise ValueError(f"block must be one of {TILE_SIZES}, got {block!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.block = int(block)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: int = 32) -> "SparseLinear":
        """A SparseLinear sharing ``linear``'s weight and bias Parameters (no copy)."""
        return super().from_linear(linear, block=block)

    def packed(self, dtype: torch.dtype | None = None):
        """The kept tiles of the current weight (kernels.BlockSparseWeight) in ``dtype`` (default:
        the weight's), cached: autocast asks for the half-precision tiles on every forward."""
        dtype = dtype or self.weight.dtype
        return self._cached(lambda w: kernels().pack_block_sparse(w.to(dtype), self.block), dtype, self.block)

    def tile_sparsity(self) -> float:
        """Fraction of the weight's BxB tiles that are all zero."""
        return kernels().tile_sparsity(self.weight, self.block)

    def _fast_path_refusal(self, x: torch.Tensor) -> str | None:
        dtype = compute_dtype(x)
        if dtype in KERNEL_DTYPES:
            return None
        return f"{dtype} inputs: the block-sparse kernel takes float32, float16 and bfloat16"

    @torch.compiler.disable  # torch.compile: a graph break around the launch (backend.py)
    def _fast_path(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast F.linear computes in the autocast dtype; so do the tiles and x here.
        dtype = self.weight.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x = x.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return kernels().block_sparse_linear(x, self.packed(dtype), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block={self.block}"


def zero_smallest_tiles_(weight: torch.Tensor, ratio: float, block: int = 32) -> torch.Tensor:
    """Zero, in place, the ``round(ratio * tiles)`` BxB tiles of smallest L2 norm; returns weight.

    A block-structured stand-in for a pruned layer, for tests and benchmarks (ties go to the
    lower tile index). Edge tiles of a dimension that is not a multiple of ``block`` count as tiles.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    if block not in TILE_SIZES:
        raise ValueError(f"block must be one of {TILE_SIZES}, got {block!r}")
    n, k = weight.shape
    r, c = -(-n // block), -(-k // block)
    with torch.no_grad():
        w = F.pad(weight.float(), (0, c * block - k, 0, r * block - n))
        norms = w.view(r, block, c, block).pow(2).sum((1, 3)).flatten()
        drop = int(round(ratio * norms.numel()))
        order = torch.sort(norms, stable=True).indices[:drop]
        keep = torch.ones(r * c, dtype=torch.bool, device=weight.device)
        keep[order] = False
        mask = keep.view(r, 1, c, 1).expand(r, block, c, block).reshape(r * block, c * block)
        weight.masked_fill_(~mask[:n, :k], 0)
    return weight
