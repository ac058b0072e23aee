"""DIMAP / LAMP scores of a module: sq_j / (sq_0 + ... + sq_j) per layer, in float64.

Three launches over layer-aligned blocks (a block never crosses a layer boundary):

1. ``_block_totals``: per block, the float64 in-block prefix sum of squares; store its maximum.
2. ``_layer_carries`` (one program per layer, tiny): per block, the float64 prefix of the
   earlier blocks' totals (the carry) and the running maximum of (carry + block total).
3. ``_block_scores``: recompute the in-block prefix, add the carry, divide.

A parallel scan's association differs from element to element, so its float64 prefixes can
step down by an ulp. Selection relies on scores being non-increasing in rank, so the prefix
S is forced non-decreasing with exact running maxima (in-block cummax, then the cross-block
maximum from launch 2). That changes S by at most its own rounding error.
"""

from __future__ import annotations

import torch

from ._common import (
    FLOAT_DTYPES,
    LaunchConfig,
    block_table,
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
_GPU_CHUNK = 1024  # blocks per carry step; three steps cover a 4.2M-weight layer
_INTERP_BLOCK = 128
_INTERP_CHUNK = 16
_CARRY_WARPS = 4
# The interpreter's cumsum is numpy's sequential accumulate, already monotone on non-negative
# input, and its generic scan calls the combine function once per element in Python; so the
# in-block cummax is skipped there unless a test forces it.
_FORCE_CUMMAX = False


def _block_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _block_totals(mags_ptr, offsets_ptr, blk_layer_ptr, blk_start_ptr, tot_ptr,
                  BLOCK: tl.constexpr, CUMMAX: tl.constexpr):
    # The prefix code is repeated verbatim in _block_scores: both launches must compute
    # bit-identical in-block prefixes (a shared @jit helper would do, but costs the interpreter
    # a re-patch of triton.language per call).
    pid = tl.program_id(0)
    layer = tl.load(blk_layer_ptr + pid)
    start = tl.load(blk_start_ptr + pid)
    end = tl.load(offsets_ptr + layer + 1)
    idx = start + tl.arange(0, BLOCK)
    valid = idx < end
    x = tl.load(mags_ptr + idx, mask=valid, other=0.0).to(tl.float64)
    sq = x * x  # exact: a 24-bit mantissa squared fits float64
    run = tl.cumsum(sq, 0)
    if CUMMAX:
        run = tl.associative_scan(run, 0, _max_combine)
    tl.store(tot_ptr + pid, tl.max(run, 0))


@triton.jit
def _layer_carries(tot_ptr, blk_off_ptr, carry_ptr, guard_ptr, CHUNK: tl.constexpr):
    layer = tl.program_id(0)
    b0 = tl.load(blk_off_ptr + layer)
    b1 = tl.load(blk_off_ptr + layer + 1)
    acc = tl.zeros((), tl.float64)  # sum of all earlier chunks' totals
    guard = tl.zeros((), tl.float64)  # max over earlier blocks of (carry + total)
    for c0 in range(b0, b1, CHUNK):
        b = c0 + tl.arange(0, CHUNK)
        ok = b < b1
        tot = tl.load(tot_ptr + b, mask=ok, other=0.0)
        # Exclusive prefix summed directly from the shifted totals, never inclusive minus own.
        prev = tl.load(tot_ptr + b - 1, mask=ok & (b > c0), other=0.0)
        carry = acc + tl.cumsum(prev, 0)
        g = tl.maximum(guard, tl.associative_scan(carry + tot, 0, _max_combine))
        tl.store(carry_ptr + b, carry, mask=ok)
        tl.store(guard_ptr + b, g, mask=ok)  # inclusive: block b+1 reads entry b
        acc = acc + tl.sum(tot, 0)
        guard = tl.maximum(guard, tl.max(g, 0))


@triton.jit
def _block_scores(mags_ptr, offsets_ptr, blk_layer_ptr, blk_start_ptr, carry_ptr, guard_ptr,
                  out_ptr, BLOCK: tl.constexpr, CUMMAX: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(blk_layer_ptr + pid)
    start = tl.load(blk_start_ptr + pid)
    end = tl.load(offsets_ptr + layer + 1)
    idx = start + tl.arange(0, BLOCK)
    valid = idx < end
    x = tl.load(mags_ptr + idx, mask=valid, other=0.0).to(tl.float64)
    sq = x * x
    run = tl.cumsum(sq, 0)
    if CUMMAX:
        run = tl.associative_scan(run, 0, _max_combine)
    first = start == tl.load(offsets_ptr + layer)
    carry = tl.load(carry_ptr + pid)
    guard = tl.load(guard_ptr + pid - 1, mask=~first, other=0.0)
    s = tl.maximum(carry + run, guard)
    # An all-zero prefix scores 0, never 0/0.
    score = tl.where(s > 0.0, sq / tl.where(s > 0.0, s, 1.0), 0.0)
    tl.store(out_ptr + idx, score, mask=valid)


def module_scores(mags: torch.Tensor, offsets: torch.Tensor, *, block_size: int | None = None
                  ) -> torch.Tensor:
    """Float64 score sq_j / S_j of every weight of a module, layers given rank-sorted descending."""
    check_1d(mags, "mags", FLOAT_DTYPES, "float32, float16 or bfloat16")
    offsets_host = check_offsets(offsets, mags.numel())
    check_runnable(_block_scores, mags.device, "module_scores")
    block = check_block(block_size or default_block(_block_scores, _GPU_BLOCK, _INTERP_BLOCK))
    chunk = default_block(_layer_carries, _GPU_CHUNK, _INTERP_CHUNK)
    dev = mags.device
    mags = mags.contiguous()
    offs = offsets.to(dev)
    blk_layer, blk_start, blk_off = block_table(offsets_host, block, dev)
    nb = blk_layer.numel()
    nl = offsets_host.numel() - 1
    tot = torch.empty(nb, dtype=torch.float64, device=dev)
    carry = torch.empty_like(tot)
    guard = torch.empty_like(tot)
    out = torch.empty(mags.numel(), dtype=torch.float64, device=dev)
    cummax = _FORCE_CUMMAX or not interpreting(_block_scores)
    warps = _block_warps(block)
    with device_guard(dev):
        _block_totals[(nb,)](mags, offs, blk_layer, blk_start, tot, BLOCK=block, CUMMAX=cummax,
                             num_warps=warps)
        _layer_carries[(nl,)](tot, blk_off, carry, guard, CHUNK=chunk, num_warps=_CARRY_WARPS)
        _block_scores[(nb,)](mags, offs, blk_layer, blk_start, carry, guard, out, BLOCK=block,
                             CUMMAX=cummax, num_warps=warps)
    return out


def module_scores_reference(mags: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Plain-torch module_scores: per-layer float64 cumsum of squares, literally."""
    check_1d(mags, "mags", FLOAT_DTYPES, "float32, float16 or bfloat16")
    offsets_host = check_offsets(offsets, mags.numel()).tolist()
    out = torch.empty(mags.numel(), dtype=torch.float64, device=mags.device)
    for a, b in zip(offsets_host[:-1], offsets_host[1:]):
        sq = mags[a:b].to(torch.float64) ** 2
        s = torch.cumsum(sq, 0)
        out[a:b] = torch.where(s > 0, sq / torch.where(s > 0, s, torch.ones_like(s)), 0.0)
    return out


def launch_configs() -> list[LaunchConfig]:
    """What module_scores launches on a GPU at its default block (the engine never passes one)."""
    f64, i64 = pointer(torch.float64), pointer(torch.int64)
    table = dict(offsets_ptr=i64, blk_layer_ptr=pointer(torch.int32), blk_start_ptr=i64)
    block = dict(BLOCK=_GPU_BLOCK, CUMMAX=True)  # a GPU always takes the in-block cummax
    warps = _block_warps(_GPU_BLOCK)
    out = [LaunchConfig.of(_layer_carries, f"importance _layer_carries CHUNK={_GPU_CHUNK}",
                           dict(tot_ptr=f64, blk_off_ptr=i64, carry_ptr=f64, guard_ptr=f64),
                           dict(CHUNK=_GPU_CHUNK), _CARRY_WARPS)]
    for dtype in FLOAT_DTYPES:
        mags = pointer(dtype)
        label = f"{mags[1:]} BLOCK={_GPU_BLOCK}"
        out.append(LaunchConfig.of(_block_totals, f"importance _block_totals {label}",
                                   dict(table, mags_ptr=mags, tot_ptr=f64), block, warps))
        out.append(LaunchConfig.of(_block_scores, f"importance _block_scores {label}",
                                   dict(table, mags_ptr=mags, carry_ptr=f64, guard_ptr=f64,
                                        out_ptr=f64), block, warps))
    return out
