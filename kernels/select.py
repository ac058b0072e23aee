"""Per-layer keep counts for many global keep totals at once, exact under the total order.

Total order: score descending, then layer ascending, then rank ascending. Scores are
non-negative and non-increasing in rank within a layer, so every layer keeps a prefix of its
ranks and counting "scores >= t" in a layer is a binary search.

One launch, each program a few keep totals M: find t* = the M-th largest score exactly by a
radix select over the float64 bit patterns (non-negative doubles order like their int64
bits), counting every layer's scores >= a candidate by a binary search vectorised over
(ratio, candidate, layer); then each layer keeps its scores > t* plus, in layer order, as
many of its ties (== t*) as the total still needs.
"""

from __future__ import annotations

import torch

from ._common import (
    LaunchConfig,
    check_1d,
    check_offsets,
    check_runnable,
    device_guard,
    interpreting,
    pointer,
    tl,
    triton,
)

_RADIX_BITS = 3  # 8 candidates per round, 21 rounds cover the 63 bits of a non-negative key
_ROUNDS = 63 // _RADIX_BITS
_GPU_LAYERS = 128  # layers searched side by side (Swin modules have <= 96)
_GPU_RATIOS = 2
_WARPS = 4
_INTERP_LAYERS = 8
_INTERP_RATIOS = 16  # the interpreter pays per operation, not per lane: batch ratios widely


@triton.jit
def _keep_counts(keys_ptr, offsets_ptr, keep_ptr, out_ptr, R, L, SEARCH_STEPS,
                 ROUNDS: tl.constexpr, RADIX_BITS: tl.constexpr, RADIX: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    m = tl.load(keep_ptr + rows, mask=row_ok, other=0)
    digit = tl.arange(0, RADIX).to(tl.int64)

    # Radix select from the top bit down: t holds the high bits of t* found so far, and
    # count(keys >= t) >= m always holds (every key is >= 0). Each round tests the 8 values of
    # the next 3 bits at once; counts fall as the candidate grows, so the passing digits are a
    # prefix and the largest of them is (number passing - 1).
    t = tl.zeros((BLOCK_R,), tl.int64)
    for i in range(ROUNDS):
        shift = (ROUNDS - 1 - i) * RADIX_BITS
        cand = t[:, None] + (digit[None, :] << shift)  # [R, RADIX]
        total = tl.zeros((BLOCK_R, RADIX), tl.int64)
        for l0 in range(0, L, BLOCK_L):
            lay = l0 + tl.arange(0, BLOCK_L)
            ok = lay < L
            first = tl.load(offsets_ptr + lay, mask=ok, other=0)[None, None, :]
            a = first + tl.zeros((BLOCK_R, RADIX, BLOCK_L), tl.int64)
            b = tl.load(offsets_ptr + lay + 1, mask=ok, other=0)[None, None, :] + \
                tl.zeros((BLOCK_R, RADIX, BLOCK_L), tl.int64)
            # Keys descend within a layer: the first rank with key < cand is the count >= cand.
            for _s in range(SEARCH_STEPS):
                act = a < b
                c = a + (b - a) // 2
                key = tl.load(keys_ptr + c, mask=act, other=0)
                ge = key >= cand[:, :, None]
                a = tl.where(act & ge, c + 1, a)
                b = tl.where(act & ~ge, c, b)
            total += tl.sum(a - first, 2)
        passing = tl.sum((total >= m[:, None]).to(tl.int64), 1)
        t += (passing - 1) << shift

    # t is now t*, the m-th largest key (all ones when m == 0: nothing reaches it). Keep the
    # scores > t*, then hand out ties (== t*) in layer order, chunk by chunk.
    n_gt = tl.zeros((BLOCK_R,), tl.int64)
    for l0 in range(0, L, BLOCK_L):
        lay = l0 + tl.arange(0, BLOCK_L)
        ok = lay < L
        first = tl.load(offsets_ptr + lay, mask=ok, other=0)[None, :]
        a = first + tl.zeros((BLOCK_R, BLOCK_L), tl.int64)
        b = tl.load(offsets_ptr + lay + 1, mask=ok, other=0)[None, :] + \
            tl.zeros((BLOCK_R, BLOCK_L), tl.int64)
        for _s in range(SEARCH_STEPS):
            act = a < b
            c = a + (b - a) // 2
            key = tl.load(keys_ptr + c, mask=act, other=0)
            ge = key > t[:, None]
            a = tl.where(act & ge, c + 1, a)
            b = tl.where(act & ~ge, c, b)
        n_gt += tl.sum(a - first, 1)
    ties_left = m - n_gt
    for l0 in range(0, L, BLOCK_L):
        lay = l0 + tl.arange(0, BLOCK_L)
        ok = lay < L
        first = tl.load(offsets_ptr + lay, mask=ok, other=0)[None, :]
        end = tl.load(offsets_ptr + lay + 1, mask=ok, other=0)[None, :]
        # Two searches side by side: (a, b) for > t*, (a2, b2) for >= t*.
        a = first + tl.zeros((BLOCK_R, BLOCK_L), tl.int64)
        b = end + tl.zeros((BLOCK_R, BLOCK_L), tl.int64)
        a2 = a
        b2 = b
        for _s in range(SEARCH_STEPS):
            act = a < b
            c = a + (b - a) // 2
            key = tl.load(keys_ptr + c, mask=act, other=0)
            ge = key > t[:, None]
            a = tl.where(act & ge, c + 1, a)
            b = tl.where(act & ~ge, c, b)
            act2 = a2 < b2
            c2 = a2 + (b2 - a2) // 2
            key2 = tl.load(keys_ptr + c2, mask=act2, other=0)
            ge2 = key2 >= t[:, None]
            a2 = tl.where(act2 & ge2, c2 + 1, a2)
            b2 = tl.where(act2 & ~ge2, c2, b2)
        gt = a - first
        eq = a2 - a
        before = tl.cumsum(eq, 1) - eq  # ties of earlier layers in this chunk (integers: exact)
        take = tl.minimum(tl.maximum(ties_left[:, None] - before, 0), eq)
        tl.store(out_ptr + rows[:, None] * L + lay[None, :], gt + take,
                 mask=row_ok[:, None] & ok[None, :])
        ties_left -= tl.sum(take, 1)


def _check(scores, offsets, keep):
    check_1d(scores, "scores", (torch.float64,), "float64")
    offsets_host = check_offsets(offsets, scores.numel())
    check_1d(keep, "keep", (torch.int64,), "int64")
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) > scores.numel()):
        raise ValueError(f"keep totals must lie in [0, {scores.numel()}]")
    return offsets_host


def select_keep_counts(scores: torch.Tensor, offsets: torch.Tensor, keep: torch.Tensor, *,
                       block_layers: int | None = None) -> torch.Tensor:
    """Int64 [R, L] per-layer keep counts whose union is exactly the top keep[r] scores."""
    offsets_host = _check(scores, offsets, keep)
    check_runnable(_keep_counts, scores.device, "select_keep_counts")
    dev = scores.device
    nl = offsets_host.numel() - 1
    out = torch.empty((keep.numel(), nl), dtype=torch.int64, device=dev)
    if keep.numel() == 0:
        return out
    interp = interpreting(_keep_counts)
    if block_layers is None:
        block_layers = _INTERP_LAYERS if interp else _GPU_LAYERS
    block_layers = min(triton.next_power_of_2(int(block_layers)), triton.next_power_of_2(nl))
    r = keep.numel()
    block_r = min(_INTERP_RATIOS if interp else _GPU_RATIOS, triton.next_power_of_2(r))
    # The search compares bit patterns; the kernel never reinterprets bits itself.
    keys = scores.contiguous().view(torch.int64)
    longest = int((offsets_host[1:] - offsets_host[:-1]).max())
    with device_guard(dev):
        _keep_counts[(triton.cdiv(r, block_r),)](
            keys, offsets.to(dev), keep.to(dev).contiguous(), out, r, nl, longest.bit_length(),
            ROUNDS=_ROUNDS, RADIX_BITS=_RADIX_BITS, RADIX=1 << _RADIX_BITS, BLOCK_R=block_r,
            BLOCK_L=block_layers, num_warps=_WARPS,
        )
    return out


def select_keep_counts_reference(scores: torch.Tensor, offsets: torch.Tensor,
                                 keep: torch.Tensor) -> torch.Tensor:
    """Plain-torch select_keep_counts: stable sort by score descending, take the top M, count."""
    offsets_host = _check(scores, offsets, keep)
    # The flat order is already (layer, rank) ascending, so a stable descending sort by score
    # is the total order.
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices
    layer_of = torch.bucketize(order, offsets_host[1:], right=True)
    nl = offsets_host.numel() - 1
    rows = [torch.bincount(layer_of[: int(m)], minlength=nl) for m in keep.cpu().tolist()]
    out = torch.stack(rows) if rows else torch.empty((0, nl), dtype=torch.int64)
    return out.to(torch.int64).to(scores.device)


def _powers_of_two(top: int) -> list[int]:
    """1, 2, 4, ... up to triton.next_power_of_2(top), the sizes a launch clamps its blocks to."""
    return [1 << i for i in range((top - 1).bit_length() + 1)]


def launch_configs() -> list[LaunchConfig]:
    """What select_keep_counts launches on a GPU at its default block_layers (the engine never
    passes one): blocks shrink to the next power of two of the ratio and layer counts."""
    i64 = pointer(torch.int64)
    types = dict(keys_ptr=i64, offsets_ptr=i64, keep_ptr=i64, out_ptr=i64, R="i32", L="i32",
                 SEARCH_STEPS="i32")
    return [
        LaunchConfig.of(_keep_counts, f"select _keep_counts BLOCK_R={block_r} BLOCK_L={block_l}",
                        types, dict(ROUNDS=_ROUNDS, RADIX_BITS=_RADIX_BITS, RADIX=1 << _RADIX_BITS,
                                    BLOCK_R=block_r, BLOCK_L=block_l), _WARPS)
        for block_r in _powers_of_two(_GPU_RATIOS)
        for block_l in _powers_of_two(_GPU_LAYERS)
    ]
