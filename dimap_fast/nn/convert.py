"""``convert(model)``: swap a pruned timm Swin's attention and MLP layers, in place.

- every timm ``SwinTransformerBlock`` becomes a ``SwinBlock`` (fused attention fast path) and its
  ``WindowAttention`` the drop-in ``WindowAttention``; SwinV2's ``SwinTransformerV2Block`` and
  cosine ``WindowAttention`` become ``SwinV2Block`` and ``WindowAttentionV2``. All only change
  class, so parameters, buffers and the state_dict stay as they were. Any other attention module
  (swinv2_cr's, say) is left on its own code, with a warning naming it;
- every prunable nn.Linear (the module map's QKV-M, PRJ-M, MLP-M weights) whose all-zero tiles
  make up at least ``min_sparsity`` of its tiles becomes a ``SparseLinear`` that shares its
  Parameters. Below that the dense GEMM is kept: skipping few tiles cannot pay for the sparse
  kernel's narrower tiles (the 0.25 default is an estimate, not yet measured on a GPU).
  A Linear on the meta device has no values to count zeros in: it stays dense. Build on meta,
  convert, materialize and load the pruned weights, then ``convert`` again to swap the sparse ones.

On CPU the converted model runs the same torch operations as before: identical logits. It also
scripts (TorchScript runs the torch path), traces with torch.fx, compiles, extracts features and
resizes (``set_input_size``) as timm's model does; see backend.py for how each meets the kernels.
"""

from __future__ import annotations

import fnmatch

import warnings

from torch import nn
from timm.models import swin_transformer as timm_swin
from timm.models import swin_transformer_v2 as timm_v2

from ..errors import DimapError
from ..modules import check_module_map
from .sparse_linear import BLOCKS, SparseLinear
from .swin_block import SwinBlock
from .swinv2 import SwinV2Block, WindowAttentionV2
from .window_attention import WindowAttention

# timm class -> drop-in that adopts it in place (exact types: a subclass may change the forward)
_SWAPS = {timm_swin.SwinTransformerBlock: SwinBlock, timm_swin.WindowAttention: WindowAttention,
          timm_v2.SwinTransformerV2Block: SwinV2Block, timm_v2.WindowAttention: WindowAttentionV2}


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
    Linears on the meta device stay dense (no zeros to count yet): after ``to_empty`` and loading
    the pruned weights, ``convert`` again swaps in the sparse ones.
    """
    if not isinstance(model, nn.Module):
        raise DimapError(f"convert expects a torch.nn.Module (a timm Swin), got {type(model).__name__}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise DimapError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
    if block is not None and block not in BLOCKS:
        raise DimapError(f"block must be one of {BLOCKS} or None (choose per layer), got {block!r}")
    patterns = [p for ps in check_module_map(module_map).values() for p in ps]
    touched = 0
    left = {}
    for name, module in list(model.named_modules()):
        kind = type(module)
        if kind in _SWAPS.values() or kind is SparseLinear:
            touched += 1  # converted before: converting again changes nothing
        elif kind in _SWAPS:
            _SWAPS[kind].adopt(module)
            touched += 1
        elif "Attention" in kind.__name__ and not _inside_swapped(model, name):
            left.setdefault(f"{kind.__module__}.{kind.__name__}", []).append(name)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        pname = f"{name}.weight"
        if not any(fnmatch.fnmatchcase(pname, p) for p in patterns):
            continue
        touched += 1
        if module.weight.is_meta:
            continue  # no values yet: see the module docstring
        side, sparsity = choose_block(module.weight, block)
        if sparsity >= min_sparsity and sparsity > 0:
            _set_submodule(model, name, SparseLinear.from_linear(module, side))
    if not touched:
        raise DimapError("convert found no timm Swin block, window attention or prunable Linear: "
                         "pass a timm swin_* model (or a module_map naming its Linear weights)")
    if left:
        kinds = "; ".join(f"{len(names)} x {kind} (e.g. {names[0]})" for kind, names in left.items())
        warnings.warn(f"convert left these attention modules on their own code: {kinds}. The fused "
                      "kernels cover timm's swin_* and swinv2_* (not swinv2_cr) window attention.",
                      stacklevel=2)
    return model


def _inside_swapped(model: nn.Module, name: str) -> bool:
    """Whether ``name`` lies inside a module that convert swapped (its parts are covered)."""
    parts = name.split(".")
    return any(type(model.get_submodule(".".join(parts[:i]))) in _SWAPS.values()
               for i in range(1, len(parts)))


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
