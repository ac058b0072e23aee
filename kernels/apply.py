"""Apply per-layer magnitude cutoffs to a module's flat weights, in place.

Rule per layer l: keep |w| > cut[l]; of the weights with |w| == cut[l], keep the first
keep[l] - count(|w| > cut[l]) by flat index; zero the rest.

Four launches over layer-aligned blocks of every layer at once: ``_count_block`` counts > and ==
per block; ``_block_quotas`` (a program per layer) turns those into each block's tie quota by
integer scans over the layer's blocks (exact); ``_apply_block`` writes the mask of each block
whose quota is none or all of its ties, zeroes the dropped weights (or, for masks only, leaves
them) and counts what it kept; ``_split_block`` (a program per layer) does the same for the one
block of a layer, if any, whose quota ends among its ties, ranking them by a scan over the block.
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
    interpreting,
    pointer,
    tl,
    triton,
)

_GPU_BLOCK = 2048  # 8 warps: ~90 registers, two programs per SM, no spills (ptxas sm_90a)
_INTERP_BLOCK = 256
_QUOTA_CHUNK = 256  # blocks of a layer scanned at a time
_INTERP_QUOTA_CHUNK = 16


def _block_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


@triton.jit
def _count_block(w_ptr, offsets_ptr, blk_layer_ptr, blk_start_ptr, cut_ptr, split_ptr, gt_ptr, eq_ptr,
                 BLOCK: tl.constexpr, ALIGNED: tl.constexpr, SKIP: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(blk_layer_ptr + pid)
    start = tl.load(blk_start_ptr + pid)
    end = tl.load(offsets_ptr + layer + 1)
    if SKIP:  # a layer whose cut splits no run of ties keeps them all: counted as none here,
        # its quota is then the whole keep count, every tie (see _block_quotas)
        end = tl.where(tl.load(split_ptr + layer) != 0, end, start)
    if ALIGNED:  # every layer offset and block start a multiple of 16: vector loads
        start = tl.multiple_of(start, 16)
        end = tl.multiple_of(end, 16)
    idx = start + tl.arange(0, BLOCK)
    valid = idx < end
    # float16/bfloat16 widen to float32 exactly, so comparing in float32 is exact.
    a = tl.abs(tl.load(w_ptr + idx, mask=valid, other=0.0).to(tl.float32))
    cut = tl.load(cut_ptr + layer)
    tl.store(gt_ptr + pid, tl.sum((valid & (a > cut)).to(tl.int32), 0))
    tl.store(eq_ptr + pid, tl.sum((valid & (a == cut)).to(tl.int32), 0))


@triton.jit
def _block_quotas(gt_ptr, eq_ptr, blk_off_ptr, keep_ptr, quota_ptr, split_ptr, CHUNK: tl.constexpr):
    layer = tl.program_id(0)
    b0 = tl.load(blk_off_ptr + layer)
    b1 = tl.load(blk_off_ptr + layer + 1)
    lane = tl.arange(0, CHUNK)
    n_gt = tl.zeros((), tl.int64)
    for c0 in range(b0, b1, CHUNK):
        b = c0 + lane
        n_gt += tl.sum(tl.load(gt_ptr + b, mask=b < b1, other=0).to(tl.int64), 0)
    need = tl.maximum(tl.load(keep_ptr + layer) - n_gt, 0)  # ties the layer keeps
    before = tl.zeros((), tl.int64)  # ties in the layer's earlier chunks
    split = tl.full((), -1, tl.int64)
    for c0 in range(b0, b1, CHUNK):
        b = c0 + lane
        ok = b < b1
        eq = tl.load(eq_ptr + b, mask=ok, other=0)  # a chunk's ties fit int32: CHUNK x BLOCK
        ahead = before + (tl.cumsum(eq, 0) - eq).to(tl.int64)
        # A quota past the block's size means every tie: clamped, it fits int32.
        quota = tl.minimum(tl.maximum(need - ahead, 0), 2147483647).to(tl.int32)
        # Where the quota ends among a block's ties (once a layer at most), the block is left to
        # _split_block: its quota is stored negated.
        inside = (quota > 0) & (quota < eq)
        tl.store(quota_ptr + b, tl.where(inside, -quota, quota), mask=ok)
        split = tl.maximum(split, tl.max(tl.where(inside & ok, b, -1), 0))
        before += tl.sum(eq, 0).to(tl.int64)
    tl.store(split_ptr + layer, split)


@triton.jit
def _apply_block(w_ptr, offsets_ptr, blk_layer_ptr, blk_start_ptr, cut_ptr, quota_ptr, mask_ptr,
                 kept_ptr, BLOCK: tl.constexpr, ZERO: tl.constexpr, COUNT: tl.constexpr,
                 ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(blk_layer_ptr + pid)
    start = tl.load(blk_start_ptr + pid)
    end = tl.load(offsets_ptr + layer + 1)
    if ALIGNED:
        start = tl.multiple_of(start, 16)
        end = tl.multiple_of(end, 16)
    quota = tl.load(quota_ptr + pid)
    mine = quota >= 0  # else _split_block's: an empty range here
    idx = start + tl.arange(0, BLOCK)
    valid = idx < tl.where(mine, end, start)
    w = tl.load(w_ptr + idx, mask=valid, other=0.0)
    a = tl.abs(w.to(tl.float32))
    cut = tl.load(cut_ptr + layer)
    tie = tl.where(quota > 0, cut, float("nan"))  # a quota here is every tie or none (nan: none)
    keep = valid & ((a > cut) | (a == tie))
    tl.store(mask_ptr + idx, keep.to(tl.uint8), mask=valid)
    if ZERO:
        tl.store(w_ptr + idx, tl.zeros_like(w), mask=valid & ~keep)
    if COUNT:
        tl.store(kept_ptr + pid, tl.sum(keep.to(tl.int32), 0), mask=mine)


@triton.jit
def _split_block(w_ptr, offsets_ptr, blk_start_ptr, cut_ptr, quota_ptr, split_ptr, mask_ptr, kept_ptr,
                 BLOCK: tl.constexpr, ZERO: tl.constexpr, COUNT: tl.constexpr):
    layer = tl.program_id(0)
    blk = tl.load(split_ptr + layer)
    mine = blk >= 0
    blk = tl.maximum(blk, 0)
    start = tl.load(blk_start_ptr + blk)
    end = tl.load(offsets_ptr + layer + 1)
    quota = -tl.load(quota_ptr + blk)
    idx = start + tl.arange(0, BLOCK)
    valid = idx < tl.where(mine, end, start)
    w = tl.load(w_ptr + idx, mask=valid, other=0.0)
    a = tl.abs(w.to(tl.float32))
    cut = tl.load(cut_ptr + layer)
    eq = (valid & (a == cut)).to(tl.int32)
    tie_rank = tl.cumsum(eq, 0) - eq  # ties before this one in the block (integers: exact)
    keep = valid & ((a > cut) | ((eq != 0) & (tie_rank < quota)))
    tl.store(mask_ptr + idx, keep.to(tl.uint8), mask=valid)
    if ZERO:
        tl.store(w_ptr + idx, tl.zeros_like(w), mask=valid & ~keep)
    if COUNT:
        tl.store(kept_ptr + blk, tl.sum(keep.to(tl.int32), 0), mask=mine)


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
        self.aligned = block % 16 == 0 and not (offsets % 16).any()
        put = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
        self.offsets, self.blk_layer, self.blk_start = put(offsets), put(layer.astype(np.int32)), put(start)
        self.blk_off, self.blk_layer_l = put(blk_off), put(layer)


def default_tables(sizes, device) -> ApplyTables:
    return ApplyTables(sizes, device, default_block(_apply_block, _GPU_BLOCK, _INTERP_BLOCK))


def cut_from_tables(w: torch.Tensor, t: ApplyTables, cut: torch.Tensor, keep: torch.Tensor, *,
                    zero: bool, count: bool = True, split: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """apply_cutoffs without the checks: ``t`` fits ``w``, cut and keep are on its device.
    ``zero=False`` only writes the mask; ``count=False`` returns no kept counts (None).
    ``split`` (int32 per layer, optional): 0 where the layer has exactly ``keep`` weights with
    |w| >= cut (its cut splits no run of equal magnitudes), which are then not counted."""
    dev = w.device
    nb, nl = t.blocks, t.layers
    gt = torch.empty(nb, dtype=torch.int32, device=dev)
    eq = torch.empty_like(gt)
    quota = torch.empty_like(gt)
    mask = torch.empty(w.numel(), dtype=torch.uint8, device=dev)
    kept_blk = torch.empty_like(gt)
    split_blk = torch.empty(nl, dtype=torch.int64, device=dev)
    warps = _block_warps(t.block)
    chunk = _INTERP_QUOTA_CHUNK if interpreting(_block_quotas) else _QUOTA_CHUNK
    with device_guard(dev):
        _count_block[(nb,)](w, t.offsets, t.blk_layer, t.blk_start, cut,
                            t.blk_layer if split is None else split,  # unread when None
                            gt, eq, BLOCK=t.block, ALIGNED=t.aligned, SKIP=split is not None,
                            num_warps=warps)
        _block_quotas[(nl,)](gt, eq, t.blk_off, keep, quota, split_blk, CHUNK=chunk, num_warps=4)
        _apply_block[(nb,)](w, t.offsets, t.blk_layer, t.blk_start, cut, quota, mask, kept_blk,
                            BLOCK=t.block, ZERO=zero, COUNT=count, ALIGNED=t.aligned, num_warps=warps)
        _split_block[(nl,)](w, t.offsets, t.blk_start, cut, quota, split_blk, mask, kept_blk,
                            BLOCK=t.block, ZERO=zero, COUNT=count, num_warps=warps)
    kept = None
    if count:
        kept = torch.zeros(nl, dtype=torch.int64, device=dev).index_add_(0, t.blk_layer_l, kept_blk.long())
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
    """What the engine launches on a GPU at the default block: apply_cutoffs (zero and count)
    and the GPU plan's masks (neither; float32 |w| whose layers start at multiples of 16 in
    Swin and most models: aligned)."""
    i32, i64 = pointer(torch.int32), pointer(torch.int64)
    table = dict(offsets_ptr=i64, blk_layer_ptr=i32, blk_start_ptr=i64, cut_ptr=pointer(torch.float32))
    warps = _block_warps(_GPU_BLOCK)
    out = [LaunchConfig.of(_block_quotas, f"apply _block_quotas CHUNK={_QUOTA_CHUNK}",
                           dict(gt_ptr=i32, eq_ptr=i32, blk_off_ptr=i64, keep_ptr=i64, quota_ptr=i32,
                                split_ptr=i64), dict(CHUNK=_QUOTA_CHUNK), 4)]
    for dtype, aligned in [(d, False) for d in FLOAT_DTYPES] + [(torch.float32, True)]:
        w = pointer(dtype)
        label = f"{w[1:]} BLOCK={_GPU_BLOCK}{' ALIGNED' if aligned else ''}"
        for skip in (False, True) if dtype == torch.float32 else (False,):  # the GPU plan's |w|: skips
            out.append(LaunchConfig.of(_count_block, f"apply _count_block {label}{' SKIP' if skip else ''}",
                                       dict(table, w_ptr=w, split_ptr=i32, gt_ptr=i32, eq_ptr=i32),
                                       dict(BLOCK=_GPU_BLOCK, ALIGNED=aligned, SKIP=skip), warps))
        for zero in (True, False):
            flags = dict(BLOCK=_GPU_BLOCK, ZERO=zero, COUNT=zero)
            out.append(LaunchConfig.of(_apply_block, f"apply _apply_block {label} ZERO={zero}",
                                       dict(table, w_ptr=w, quota_ptr=i32, mask_ptr=pointer(torch.uint8),
                                            kept_ptr=i32), dict(flags, ALIGNED=aligned), warps))
            if not aligned:
                out.append(LaunchConfig.of(_split_block, f"apply _split_block {label} ZERO={zero}",
                                           dict(w_ptr=w, offsets_ptr=i64, blk_start_ptr=i64,
                                                cut_ptr=pointer(torch.float32), quota_ptr=i32,
                                                split_ptr=i64, mask_ptr=pointer(torch.uint8),
                                                kept_ptr=i32), flags, warps))
    return out
