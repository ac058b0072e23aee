"""nn.Linear drop-ins that multiply by one of torch's own sparse copies of the weight.

- ``BsrLinear``: torch's block-sparse row tensor (``weight.to_sparse_bsr``). CPU: float32 and
  float64 (MKL); CUDA: float16, bfloat16 and float32.
- ``SemiSparseLinear``: 2:4 semi-structured sparsity (``torch.sparse.to_sparse_semi_structured``,
  CUTLASS / cuSPARSELt), CUDA sm80+ only, for a weight with at most 2 nonzeros in every 4 along a row.

Both are inference modules, like ``SparseLinear``: the dense zero-filled weight stays the Parameter
(same state_dict and Parameter objects as the Linear they came from), and the sparse copy is built on
first use and rebuilt whenever the weight changes. The sparse product runs only under
``torch.no_grad()`` / ``torch.inference_mode()`` (or with no tensor needing gradients), in the weight's
own dtype, on its device, outside autocast, and under backend "auto" or "triton"; anything else runs
``F.linear`` on the dense weight, so training and TorchScript give exactly nn.Linear's results. (Why:
torch has no autograd to the activations through a BSR weight on CPU, "addmm: computation on CPU is
not implemented for Strided + Strided @ SparseBsr", and 2:4 tensors are CUDA-only.)
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from .backend import compute_dtype
from .derived_linear import DerivedLinear

BSR_DTYPES = {"cpu": (torch.float32, torch.float64),
              "cuda": (torch.float16, torch.bfloat16, torch.float32)}
SEMI_DTYPES = (torch.float16, torch.bfloat16)  # 2:4 on the tensor cores


def is_2to4(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive weights along a row holds at most 2 nonzeros."""
    if weight.dim() != 2 or weight.shape[1] % 4 or weight.is_meta:
        return False
    return bool(((weight.detach() != 0).view(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def semi_structured_supported(device: torch.device) -> bool:
    """2:4 needs CUDA sm80+ and a torch with ``to_sparse_semi_structured``."""
    return (torch.device(device).type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (8, 0)
            and hasattr(torch.sparse, "to_sparse_semi_structured"))


class _SparseCopyLinear(DerivedLinear):
    """An nn.Linear whose no-grad forward multiplies by a cached sparse copy of its weight."""

    def sparse_weight(self) -> torch.Tensor:
        """The sparse copy of the current weight, rebuilt when the weight changed."""
        return self._cached(self._quiet_sparse)

    def _quiet_sparse(self, w: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # torch's "sparse support is in beta" on every build
            warnings.simplefilter("ignore", UserWarning)
            return self._make_sparse(w)

    def _make_sparse(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _supports(self, x: torch.Tensor) -> bool:
        raise NotImplementedError

    fast_path_is_triton = False  # torch's sparse product: any device, and backend "triton" too

    def _fast_path_refusal(self, x: torch.Tensor) -> str | None:
        w = self.weight
        if x.dtype != w.dtype or x.device != w.device or compute_dtype(x) != x.dtype:
            return "the sparse copy multiplies in the weight's own dtype, on its device, outside autocast"
        return None if self._supports(x) else f"{x.dtype} on {x.device.type}"

    def _fast_path(self, x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return F.linear(x, self.sparse_weight(), self.bias)


class BsrLinear(_SparseCopyLinear):
    """nn.Linear that multiplies by torch's BSR copy of its weight (square blocks of ``block``,
    narrowed to a common divisor of both dimensions where ``block`` does not divide them)."""

    __jit_unused_properties__ = ["blocksize"]  # TorchScript runs F.linear, never the BSR copy

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block: int = 32,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.block = int(block)

    @property
    def blocksize(self) -> tuple[int, int]:
        # to_sparse_bsr needs blocks that divide the weight (Swin's 96 columns take 32, not 64),
        # and MKL (CPU) square ones
        side = math.gcd(self.out_features, self.in_features, self.block)
        return side, side

    def _make_sparse(self, w: torch.Tensor) -> torch.Tensor:
        return w.to_sparse_bsr(self.blocksize)

    def _supports(self, x: torch.Tensor) -> bool:
        return x.dtype in BSR_DTYPES.get(x.device.type, ())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block={self.block}, torch BSR"


class SemiSparseLinear(_SparseCopyLinear):
    """nn.Linear that multiplies by torch's 2:4 semi-structured copy of its weight (CUDA sm80+;
    the weight must be 2:4 sparse: the compressed copy keeps 2 of every 4 and drops the rest)."""

    def _make_sparse(self, w: torch.Tensor) -> torch.Tensor:
        return torch.sparse.to_sparse_semi_structured(w.contiguous())

    def _supports(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.dtype in SEMI_DTYPES

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, 2:4 semi-structured"
