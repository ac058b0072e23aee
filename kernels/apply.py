"""Apply per-layer magnitude cutoffs to a module's flat weights, in place.

Rule per layer l: keep |w| > cut[l]; of the weights with |w| == cut[l], keep the first
keep[l] - count(|w| > cut[l]) by flat index; zero the rest.

Two launches over layer-aligned blocks of every layer at once: ``_count_block`` counts > and ==
per block; torch turns those into each block's tie quota (integer scans: exact); ``_apply_block``
keeps its block's first ``quota`` ties, writes the mask, zeroes the dropped weights (or, for masks
only, leaves them) and counts what it kept.
"""

from __future__ import annotations

import numpy as np
import torch

from ._common import (
    FLOAT_DTYPES,
    LaunchConfig,
    check_1d,
    check_block,
    check_offsets,
    check_runnable,
    default_block,
    device_guard,
    pointer,
    tl,
    triton,
)

_GPU_BLOCK = 2048  # 8 warps: ~90 registers, two programs per SM, no spills (ptxas sm_90a)
_INTERP_BLOCK = 256


def _block_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


@triton.jit
def _count_block(w_ptr, offsets_ptr, blk_layer_ptr, blk_start_ptr, cut_ptr, gt_ptr, eq_ptr,
                 BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(blk_layer_ptr + pid)
    start = tl.load(blk_start_ptr + pid)
    end = tl.load(offsets_ptr + layer + 1)
    idx = start + tl.arange(0, BLOCK)
    valid = idx < end
    # float16/bfloat16 widen to float32 exactly, so comparing in float32 is exact.
    a = tl.abs(tl.load(w_ptr + idx, mask=valid, other=0.0).to(tl.float32))
    cut = tl.load(cut_ptr + layer)
    tl.store(gt_ptr + pid, tl.sum((valid & (a > cut)).to(tl.int64), 0))
    tl.store(eq_ptr + pid, tl.sum((valid & (a == cut)).to(tl.int64), 0))


@triton.jit
def _apply_block(w_ptr, offsets_ptr, blk_layer_ptr, blk_start_ptr, cut_ptr, quota_ptr, mask_ptr,
                 kept_ptr, BLOCK: tl.constexpr, ZERO: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(blk_layer_ptr + pid)
    start = tl.load(blk_start_ptr + pid)
    end = tl.load(offsets_ptr + layer + 1)
    idx = start + tl.arange(0, BLOCK)
    valid = idx < end
    w = tl.load(w_ptr + idx, mask=valid, other=0.0)
    a = tl.abs(w.to(tl.float32))
    cut = tl.load(cut_ptr + layer)
    quota = tl.load(quota_ptr + pid)
    eq = (valid & (a == cut)).to(tl.int64)
    tie_rank = tl.cumsum(eq, 0) - eq  # ties before this one in the block (integers: exact)
    keep = valid & ((a > cut) | ((eq != 0) & (tie_rank < quota)))
    tl.store(mask_ptr + idx, keep.to(tl.uint8), mask=valid)
    if ZERO:
        tl.store(w_ptr + idx, tl.zeros_like(w), mask=valid & ~keep)
    tl.store(kept_ptr + pid, tl.sum(keep.to(tl.int64), 0))


def _check(w, offsets, cut, keep):
    check_1d(w, "w", FLOAT_DTYPES, "float32, float16 or bfloat16")
    offsets_host = check_offsets(offsets, w.numel())
    nl = offsets_host.numel() - 1
    check_1d(cut, "cut", (torch.float32,), "float32")
    check_1d(keep, "keep", (torch.int64,), "int64")
    if cut.numel() != nl or keep.numel() != nl:
        raise ValueError(f"cut and keep must have one entry per layer ({nl}), "
                         f"got {cut.numel()} and {keep.numel()}")
    return offsets_host


class ApplyTables:
    """The block table of some layer sizes, built on the host once (no device reads) and kept."""

    def __init__(self, sizes, device, block: int):
        sizes = np.asarray(sizes, dtype=np.int64)
        nblk = -(-sizes // block)
        blk_off = np.zeros(sizes.size + 1, dtype=np.int64)
        np.cumsum(nblk, out=blk_off[1:])
        offsets = np.zeros(sizes.size + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        layer = np.repeat(np.arange(sizes.size), nblk)
        start = offsets[layer] + (np.arange(layer.size) - blk_off[layer]) * block
        self.block, self.layers, self.blocks, self.n = block, int(sizes.size), int(layer.size), int(offsets[-1])
        put = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
        self.offsets, self.blk_layer, self.blk_start = put(offsets), put(layer.astype(np.int32)), put(start)
        self.blk_layer_l, self.layer_first_blk = put(layer), put(blk_off[:-1].copy())


def default_tables(sizes, device) -> ApplyTables:
    return ApplyTables(sizes, device, default_block(_apply_block, _GPU_BLOCK, _INTERP_BLOCK))


def cut_from_tables(w: torch.Tensor, t: ApplyTables, cut: torch.Tensor, keep: torch.Tensor, *,
                    zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_cutoffs without the checks: ``t`` fits ``w``, cut and keep are on its device.
    ``zero=False`` only writes the mask."""
    dev = w.device
    nb, nl = t.blocks, t.layers
    gt = torch.empty(nb, dtype=torch.int64, device=dev)
    eq = torch.empty_like(gt)
    mask = torch.empty(w.numel(), dtype=torch.uint8, device=dev)
    kept_blk = torch.empty_like(gt)
    warps = _block_warps(t.block)
    with device_guard(dev):
        _count_block[(nb,)](w, t.offsets, t.blk_layer, t.blk_start, cut, gt, eq, BLOCK=t.block,
                            num_warps=warps)
        # Ties of earlier blocks of the same layer; an inclusive global scan minus the layer's
        # base is fine here because integers do not round.
        eq_incl = torch.cumsum(eq, 0)
        layer_base = (eq_incl - eq)[t.layer_first_blk]
        eq_before = eq_incl - eq - layer_base[t.blk_layer_l]
        gt_layer = torch.zeros(nl, dtype=torch.int64, device=dev).index_add_(0, t.blk_layer_l, gt)
        need = (keep - gt_layer).clamp_min(0)
        quota = (need[t.blk_layer_l] - eq_before).clamp_min(0)
        _apply_block[(nb,)](w, t.offsets, t.blk_layer, t.blk_start, cut, quota, mask, kept_blk,
                            BLOCK=t.block, ZERO=zero, num_warps=warps)
    kept = torch.zeros(nl, dtype=torch.int64, device=dev).index_add_(0, t.blk_layer_l, kept_blk)
    return mask.view(torch.bool), kept


def apply_cutoffs(w: torch.Tensor, offsets: torch.Tensor, cut: torch.Tensor, keep: torch.Tensor,
                  *, block_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero pruned weights of flat ``w`` in place; return (bool mask, int64 kept per layer)."""
    offsets_host = _check(w, offsets, cut, keep)
    if not w.is_contiguous():
        raise ValueError("w must be contiguous: it is pruned in place")
    check_runnable(_apply_block, w.device, "apply_cutoffs")
    block = check_block(block_size or default_block(_apply_block, _GPU_BLOCK, _INTERP_BLOCK))
    dev = w.device
    t = ApplyTables(np.diff(offsets_host.numpy()), dev, block)
    return cut_from_tables(w, t, cut.to(dev).contiguous(), keep.to(dev), zero=True)


def apply_cutoffs_reference(w: torch.Tensor, offsets: torch.Tensor, cut: torch.Tensor,
                            keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch apply_cutoffs, not in place: return (new weights, bool mask, kept per layer)."""
    offsets_host = _check(w, offsets, cut, keep).tolist()
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    kept = torch.zeros(len(offsets_host) - 1, dtype=torch.int64)
    for l, (a, b) in enumerate(zip(offsets_host[:-1], offsets_host[1:])):
        mag = w[a:b].abs().to(torch.float32)
        c = cut[l].to(w.device)
        gt = mag > c
        eq = mag == c
        need = max(int(keep[l]) - int(gt.sum()), 0)
        tie_rank = torch.cumsum(eq.to(torch.int64), 0) - eq.to(torch.int64)
        m = gt | (eq & (tie_rank < need))
        mask[a:b] = m
        kept[l] = int(m.sum())
    new_w = torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
    return new_w, mask, kept.to(w.device)


def launch_configs() -> list[LaunchConfig]:
    """What apply_cutoffs launches on a GPU at its default block (the engine never passes one)."""
    i64 = pointer(torch.int64)
    table = dict(offsets_ptr=i64, blk_layer_ptr=pointer(torch.int32), blk_start_ptr=i64,
                 cut_ptr=pointer(torch.float32))
    warps = _block_warps(_GPU_BLOCK)
    out = []
    for dtype in FLOAT_DTYPES:
        w = pointer(dtype)
        label = f"{w[1:]} BLOCK={_GPU_BLOCK}"
        out.append(LaunchConfig.of(_count_block, f"apply _count_block {label}",
                                   dict(table, w_ptr=w, gt_ptr=i64, eq_ptr=i64),
                                   dict(BLOCK=_GPU_BLOCK), warps))
        for zero in (True, False):
            out.append(LaunchConfig.of(_apply_block, f"apply _apply_block {label} ZERO={zero}",
                                       dict(table, w_ptr=w, quota_ptr=i64, mask_ptr=pointer(torch.uint8),
                                            kept_ptr=i64), dict(BLOCK=_GPU_BLOCK, ZERO=zero), warps))
    return out
