"""The fused window attention's bias tile: built from timm's table and the mask, cached, and its
gradient taken back to the table.

``bias_tile`` folds the relative-position bias, the shift's regions (or an explicit mask) and the
padding into the kernels' float32 tile (``folded_bias_tile``), cached while the table and mask
are the same tensors at the same versions (``TILES``); ``table_grad`` sums the tile's gradient
back into the table's.
"""

from __future__ import annotations

import functools
import weakref

import torch

from .window_attention_reference import (dense_position_bias, folded_bias_tile,
                                         region_class_masks, relative_position_index)

TILES: dict = {}
_CACHE_SIZE = 16


_UNVERSIONED = object()


def _version(t):
    try:
        return None if t is None else t._version
    except RuntimeError:  # inference tensors keep no version counter: never cached
        return _UNVERSIONED


# A geometry's constants, built once: a training step folds the tile again (its table changed)
# from them and the table alone, about ten torch ops instead of seventy.
@functools.lru_cache(maxsize=32)
def _table_index(win, device) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():  # usable outside inference mode too
        return relative_position_index(*win, device=device).view(-1)


@functools.lru_cache(maxsize=32)
def _region_masks(win, shift, device) -> torch.Tensor | None:
    with torch.inference_mode(False), torch.no_grad():
        return region_class_masks(win, shift, device=device) if any(shift) else None


def bias_tile(table: torch.Tensor, mask, win, shift, block: int) -> torch.Tensor:
    """The folded tile of ``table`` and ``mask`` (or the shift's regions), cached while both are
    the same tensors at the same versions: in inference it is built once per layer."""
    key = (id(table), _version(table), id(mask), _version(mask), win,
           shift if mask is None else None, block, table.device)
    hit = TILES.get(key)
    if hit is not None and hit[0]() is table and (mask is None or hit[1]() is mask):
        return hit[2]
    with torch.no_grad():
        masks = mask if mask is not None else _region_masks(win, shift, table.device)
        tile = folded_bias_tile(dense_position_bias(table.detach(), win,
                                                    _table_index(win, table.device)), masks, block)
    if _UNVERSIONED not in key:
        while len(TILES) >= _CACHE_SIZE:
            TILES.pop(next(iter(TILES)))
        TILES[key] = (weakref.ref(table), None if mask is None else weakref.ref(mask), tile)
        # a table computed per call (SwinV2's) must not keep its tile alive after it is gone
        for t in (table, mask):
            if t is not None:
                weakref.finalize(t, TILES.pop, key, None)
    return tile


def table_grad(d_dense: torch.Tensor, table: torch.Tensor, win) -> torch.Tensor:
    """The gradient of timm's bias table (or of a dense bias) from that of the dense bias."""
    if table.dim() == 3:
        return d_dense.to(table.dtype)
    heads, n, _ = d_dense.shape
    idx = _table_index(win, table.device)
    grad = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
    return grad.index_add_(0, idx, d_dense.permute(1, 2, 0).reshape(n * n, heads)).to(table.dtype)

