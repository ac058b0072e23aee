"""What the sparse drop-in Linears share: the dense, zero-filled weight stays the Parameter, and a
form derived from it (packed tiles, a torch sparse copy) is cached for the faster product.

Keeping the Parameter (the same object as the Linear's) keeps the state_dict, optimizers and mask
guards working; the derived form is rebuilt whenever the weight changes (new storage, an in-place
update, another dtype or device), so it never goes stale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backend import TwoPaths, runs_fast_path

torch.fx.wrap("derived_linear_forward")  # a leaf of traced graphs: the path is chosen when the graph runs


class DerivedLinear(TwoPaths, nn.Linear):
    """nn.Linear whose forward runs ``F.linear`` or a subclass's fast path (``_fast_path``, which
    reads ``_cached`` weight forms), as backend.runs_fast_path decides."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._derived = None
        self._derived_key = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs):
        """A drop-in sharing ``linear``'s weight and bias Parameters (no copy); ``kwargs``: the
        subclass constructor's own (its block size)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"expected an nn.Linear, got {type(linear).__name__}")
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **kwargs)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def _cached(self, make, *key_extra):
        """``make(weight)`` for the current weight, built once per weight state and ``key_extra``."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, *key_extra)
        if key != self._derived_key:
            self._derived = make(w.detach())
            self._derived_key = key
        return self._derived

    def _apply(self, fn, *args, **kwargs):
        self._derived = self._derived_key = None  # .to()/.half(): rebuilt lazily after the move
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._torch_path(x)
        return derived_linear_forward(self, x)

    def _torch_path(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def derived_linear_forward(linear: DerivedLinear, x: torch.Tensor) -> torch.Tensor:
    return linear._fast_path(x) if runs_fast_path(linear, x) else linear._torch_path(x)
