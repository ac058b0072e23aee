"""``convert(model)``: swap a pruned timm Swin's attention and MLP layers, in place.

- every timm v1 ``SwinTransformerBlock`` becomes a ``SwinBlock`` (fused attention fast path) and
  its ``WindowAttention`` the drop-in ``WindowAttention``; both only change class, so parameters,
  buffers and the state_dict stay as they were;
- every prunable nn.Linear (the module map's QKV-M, PRJ-M, MLP-M weights) whose all-zero tiles
  make up at least ``min_sparsity`` of its tiles becomes a ``SparseLinear`` that shares its
  Parameters. Below that the dense GEMM is kept: skipping few tiles cannot pay for the sparse
  kernel's narrower tiles (the 0.25 default is an estimate, not yet measured on a GPU).

On CPU the converted model runs the same torch operations as before: identical logits.
"""

from __future__ import annotations

import fnmatch

from torch import nn
from timm.models import swin_transformer as timm_swin

from ..errors import DimapError
from ..modules import check_module_map
from .sparse_linear import BLOCKS, SparseLinear
from .swin_block import SwinBlock
from .window_attention import WindowAttention


def choose_block(weight, block=None) -> tuple[int, float]:
    """(block, tile sparsity) for a weight: ``block`` itself, or with None the largest tile side
    that still skips at least 90% of what the best side skips (bigger tiles run faster)."""
    from dimap_fast.kernels import tile_sparsity

    if block is not None:
        if block not in BLOCKS:
            raise DimapError(f"block must be one of {BLOCKS} or None (choose per layer), got {block!r}")
        return block, tile_sparsity(weight, block)
    found = {b: tile_sparsity(weight, b) for b in BLOCKS}
    best = max(found.values())
    side = max(b for b, s in found.items() if s >= 0.9 * best)
    return side, found[side]


def convert(model: nn.Module, block: int | None = None, *, min_sparsity: float = 0.25,
            module_map=None) -> nn.Module:
    """Swap ``model``'s Swin blocks, attentions and block-sparse Linears in place; return it.

    ``block``: tile side 16, 32 or 64 for every layer, or None to pick per layer from its zeros.
    ``module_map``: which Linear weights may become sparse (default: dimap_fast.SWIN_MODULES).
    """
    if not isinstance(model, nn.Module):
        raise DimapError(f"convert expects a torch.nn.Module (a timm Swin), got {type(model).__name__}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise DimapError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
    if block is not None and block not in BLOCKS:
        raise DimapError(f"block must be one of {BLOCKS} or None (choose per layer), got {block!r}")
    patterns = [p for ps in check_module_map(module_map).values() for p in ps]
    touched = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, (SwinBlock, WindowAttention, SparseLinear)):
            touched += 1  # converted before: converting again changes nothing
        elif type(module) is timm_swin.SwinTransformerBlock:
            SwinBlock.adopt(module)
            touched += 1
        elif type(module) is timm_swin.WindowAttention:
            WindowAttention.adopt(module)
            touched += 1
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        pname = f"{name}.weight"
        if not any(fnmatch.fnmatchcase(pname, p) for p in patterns):
            continue
        touched += 1
        side, sparsity = choose_block(module.weight, block)
        if sparsity >= min_sparsity and sparsity > 0:
            _set_submodule(model, name, SparseLinear.from_linear(module, side))
    if not touched:
        raise DimapError("convert found no timm Swin block, window attention or prunable Linear: "
                         "pass a timm swin_* model (or a module_map naming its Linear weights)")
    return model


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
