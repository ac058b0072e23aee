"""Per-layer keep counts for many (ratio, group) keep totals in one launch, exact under the total order.

A group is a run of consecutive layers that share one threshold (a DIMAP module, or every layer).
Total order inside a group: score descending, then layer ascending, then rank ascending. Scores
are non-negative and non-increasing in rank within a layer, so every layer keeps a prefix of its
ranks and counting "scores >= t" in a layer is a binary search.

One program per (ratio, group): find t* = the M-th largest score of the group exactly by a radix
select over the float64 bit patterns (non-negative doubles order like their int64 bits), 4 bits
a round, counting each layer's scores >= each of the 16 candidates by a binary search vectorised
over (candidate, layer); then each layer keeps its scores > t* plus, in layer order, as many of
its ties (== t*) as the total still needs. Layers are searched ``BLOCK_L`` at a time whatever the
group's size, so the registers do not grow with the layer count.
"""

from __future__ import annotations

import numpy as np
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

_RADIX_BITS = 4  # 16 candidates a round; 16 rounds cover the 63 bits of a non-negative key
_ROUNDS = 16
_GPU_LAYERS = 64  # [16 candidates, 64 layers] over 8 warps: 4 lanes' worth per thread; a Swin
_WARPS = 8  # module (at most 48 layers) in one chunk
_INTERP_LAYERS = 8


@triton.jit
def _keep_counts(keys_ptr, offsets_ptr, groups_ptr, keep_ptr, out_ptr, lo_ptr, hi_ptr, pos_ptr,
                 mags_ptr, cut_ptr, host_ptr, split_ptr, G, L, R, ROUNDS: tl.constexpr, RADIX_BITS: tl.constexpr,
                 RADIX: tl.constexpr, BLOCK_L: tl.constexpr, CUTS: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // G
    g = pid % G
    lo = tl.load(groups_ptr + g)
    hi = tl.load(groups_ptr + g + 1)
    m = tl.load(keep_ptr + pid)
    digit = tl.arange(0, RADIX).to(tl.int64)
    lane = tl.arange(0, BLOCK_L)
    bit = tl.arange(0, 64).to(tl.int64)
    base = row * L  # this program's rows of the scratch tables

    # [lo_ptr, hi_ptr) per layer: the ranks where the count >= any candidate still to come can
    # fall, from the whole layer down to a few ranks as t* takes shape.
    for l0 in range(lo, hi, BLOCK_L):
        lay = l0 + lane
        ok = lay < hi
        tl.store(lo_ptr + base + lay, tl.load(offsets_ptr + lay, mask=ok, other=0), mask=ok)
        tl.store(hi_ptr + base + lay, tl.load(offsets_ptr + lay + 1, mask=ok, other=0), mask=ok)
    tl.debug_barrier()

    # Radix select from the top bit down: t holds the high bits of t* found so far, and
    # count(keys >= t) >= m always holds (every key is >= 0). Counts fall as the candidate grows,
    # so the passing digits are a prefix; a candidate past the sign bit wraps below t and is
    # left out.
    t = tl.zeros((), tl.int64)
    for i in range(ROUNDS):
        shift = (ROUNDS - 1 - i) * RADIX_BITS
        cand = t + (digit << shift)
        total = tl.zeros((RADIX,), tl.int64)
        for l0 in range(lo, hi, BLOCK_L):
            lay = l0 + lane
            ok = lay < hi
            first = tl.load(offsets_ptr + lay, mask=ok, other=0)
            r0 = tl.load(lo_ptr + base + lay, mask=ok, other=0) - first
            r1 = tl.load(hi_ptr + base + lay, mask=ok, other=0) - first
            steps = tl.sum(((tl.max(r1 - r0, 0) >> bit) > 0).to(tl.int32), 0)  # its bit length
            # Ranks within a layer fit int32 (SelectTables checks): cheaper than int64 addresses.
            a = r0.to(tl.int32)[None, :] + tl.zeros((RADIX, BLOCK_L), tl.int32)
            b = r1.to(tl.int32)[None, :] + tl.zeros((RADIX, BLOCK_L), tl.int32)
            keys = keys_ptr + first[None, :]
            # Keys descend within a layer: the first rank with key < cand is the count >= cand.
            for _s in range(steps):
                act = a < b
                c = a + ((b - a) >> 1)
                key = tl.load(keys + c, mask=act, other=0)
                ge = key >= cand[:, None]
                a = tl.where(act & ge, c + 1, a)
                b = tl.where(act & ~ge, c, b)
            total += tl.sum(a.to(tl.int64), 1)
            tl.store(pos_ptr + (base + lay[None, :]) * RADIX + digit[:, None], first[None, :] + a,
                     mask=ok[None, :])
        passing = tl.sum(((total >= m) & (cand >= t)).to(tl.int64), 0)
        d = passing - 1
        # The next rounds' candidates lie in [t + d, t + d + 1) << shift: their counts between
        # those of these two (the upper one unless it wrapped or is the round's last).
        above = (d + 1 < RADIX) & (t + ((d + 1) << shift) >= t)
        tl.debug_barrier()
        for l0 in range(lo, hi, BLOCK_L):
            lay = l0 + lane
            ok = lay < hi
            at = (base + lay) * RADIX
            tl.store(hi_ptr + base + lay, tl.load(pos_ptr + at + d, mask=ok, other=0), mask=ok)
            up = tl.load(pos_ptr + at + tl.minimum(d + 1, RADIX - 1), mask=ok, other=0)
            r0 = tl.where(above, up, tl.load(lo_ptr + base + lay, mask=ok, other=0))
            tl.store(lo_ptr + base + lay, r0, mask=ok)
        tl.debug_barrier()
        t += d << shift

    # t is now t*, the m-th largest key (all ones when m == 0: nothing reaches it), and each
    # layer's range is [count > t*, count >= t*]. Keep the scores > t*, then hand out ties
    # (== t*) in layer order, chunk by chunk.
    n_gt = tl.zeros((), tl.int64)
    for l0 in range(lo, hi, BLOCK_L):
        lay = l0 + lane
        ok = lay < hi
        n_gt += tl.sum(tl.load(lo_ptr + base + lay, mask=ok, other=0) - tl.load(offsets_ptr + lay, mask=ok, other=0), 0)
    ties_left = m - n_gt
    for l0 in range(lo, hi, BLOCK_L):
        lay = l0 + lane
        ok = lay < hi
        first = tl.load(offsets_ptr + lay, mask=ok, other=0)
        r0 = tl.load(lo_ptr + base + lay, mask=ok, other=0)
        gt = r0 - first
        eq = tl.load(hi_ptr + base + lay, mask=ok, other=0) - r0
        before = tl.cumsum(eq, 0) - eq  # ties of earlier layers in this chunk (integers: exact)
        take = tl.minimum(tl.maximum(ties_left - before, 0), eq)
        count = gt + take
        tl.store(out_ptr + row * L + lay, count, mask=ok)
        ties_left -= tl.sum(take, 0)
        if CUTS:  # the layer's last kept magnitude and key (inf and 0 when it keeps none)
            kept = ok & (count > 0)
            at = first + count - 1
            mag = tl.load(mags_ptr + at, mask=kept, other=float("inf"))
            key = tl.load(keys_ptr + at, mask=kept, other=0).to(tl.float64, bitcast=True)
            tl.store(cut_ptr + row * L + lay, mag, mask=ok)
            tl.store(host_ptr + row * L + lay, count.to(tl.float64), mask=ok)
            tl.store(host_ptr + (R + row) * L + lay, mag.to(tl.float64), mask=ok)
            tl.store(host_ptr + (2 * R + row) * L + lay, key, mask=ok)
            # Does the cut split a run of equal magnitudes? If not, the layer keeps every one
            # >= its cut and the apply pass need not count them.
            end = tl.load(offsets_ptr + lay + 1, mask=ok, other=0)
            nxt = tl.load(mags_ptr + at + 1, mask=kept & (at + 1 < end), other=-1.0)
            tl.store(split_ptr + row * L + lay, (nxt == mag).to(tl.int32), mask=ok)


class SelectTables:
    """Layer offsets and group bounds on the device, built on the host once (no device reads)."""

    def __init__(self, sizes, groups, device):
        sizes = np.asarray(sizes, dtype=np.int64)
        offsets = np.zeros(sizes.size + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        groups = np.asarray(groups, dtype=np.int64)
        if sizes.size and int(sizes.max()) >= 1 << 31:
            raise ValueError(f"layers of 2^31 or more scores are not supported, got {int(sizes.max())}")
        self.layers, self.groups = int(sizes.size), int(groups.size - 1)
        self.group_sizes = offsets[groups[1:]] - offsets[groups[:-1]]
        self.offsets = torch.from_numpy(offsets).to(device, non_blocking=True)
        self.bounds = torch.from_numpy(groups).to(device, non_blocking=True)


def counts_from_tables(keys: torch.Tensor, t: SelectTables, keep: torch.Tensor) -> torch.Tensor:
    """select_keep_counts without the checks: ``keep`` is int64 [R, G] on the keys' device."""
    return _launch(keys, None, t, keep)[0]


def cuts_from_tables(keys: torch.Tensor, mags: torch.Tensor, t: SelectTables, keep: torch.Tensor):
    """counts_from_tables, and from the same launch each layer's cut: ``mags`` (float32) are the
    sorted magnitudes beside ``keys``. Returns (int64 counts [R, L], float32 cut magnitudes [R, L],
    inf where a layer keeps none, float64 [3, R, L]: counts, cuts and the keys at the cuts, int32
    [R, L]: 1 where the cut falls inside a run of equal magnitudes, else 0)."""
    return _launch(keys, mags, t, keep)


def _launch(keys, mags, t: SelectTables, keep):
    dev = keys.device
    rows = keep.shape[0]
    out = torch.empty((rows, t.layers), dtype=torch.int64, device=dev)
    cut = torch.empty((rows, t.layers), dtype=torch.float32, device=dev)
    host = torch.empty((3, rows, t.layers), dtype=torch.float64, device=dev)
    split = torch.empty((rows, t.layers), dtype=torch.int32, device=dev)
    if rows == 0 or t.groups == 0:
        return out, cut, host, split
    block_l = _INTERP_LAYERS if interpreting(_keep_counts) else _GPU_LAYERS
    lo = torch.empty_like(out)
    hi = torch.empty_like(out)
    pos = torch.empty((rows, t.layers, 1 << _RADIX_BITS), dtype=torch.int64, device=dev)
    with device_guard(dev):
        _keep_counts[(rows * t.groups,)](
            keys.view(torch.int64), t.offsets, t.bounds, keep.contiguous(), out, lo, hi, pos,
            cut if mags is None else mags, cut, host, split, t.groups, t.layers, rows, ROUNDS=_ROUNDS,
            RADIX_BITS=_RADIX_BITS, RADIX=1 << _RADIX_BITS, BLOCK_L=block_l, CUTS=mags is not None,
            num_warps=_WARPS,
        )
    return out, cut, host, split


def _check(scores, offsets, keep, groups):
    check_1d(scores, "scores", (torch.float64,), "float64")
    offsets_host = check_offsets(offsets, scores.numel()).numpy()
    nl = offsets_host.size - 1
    groups = np.array([0, nl]) if groups is None else np.asarray(groups, dtype=np.int64)
    if groups.ndim != 1 or groups.size < 2 or groups[0] != 0 or groups[-1] != nl or (np.diff(groups) <= 0).any():
        raise ValueError(f"groups must be increasing layer bounds from 0 to {nl}, got {groups.tolist()}")
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.int64:
        raise ValueError(f"keep must be an int64 tensor, got {getattr(keep, 'dtype', type(keep).__name__)}")
    ng = groups.size - 1
    if keep.dim() == 1 and ng == 1:
        keep = keep[:, None]
    if keep.dim() != 2 or keep.shape[1] != ng:
        raise ValueError(f"keep must be [R] for one group or [R, {ng}], got shape {tuple(keep.shape)}")
    keep_host = keep.detach().cpu().numpy()
    sizes = offsets_host[groups[1:]] - offsets_host[groups[:-1]]
    if keep_host.size and ((keep_host < 0).any() or (keep_host > sizes).any()):
        raise ValueError(f"keep totals must lie in [0, the group's size {sizes.tolist()}]")
    return offsets_host, groups, keep


def select_keep_counts(scores: torch.Tensor, offsets: torch.Tensor, keep: torch.Tensor, *,
                       groups=None) -> torch.Tensor:
    """Int64 [R, L] per-layer keep counts whose union in each group is exactly its top keep[r, g]
    scores. ``groups``: layer bounds [0, ..., L] of the groups (default: one group of all layers);
    ``keep``: int64 [R, G] ([R] for one group)."""
    offsets_host, groups, keep = _check(scores, offsets, keep, groups)
    check_runnable(_keep_counts, scores.device, "select_keep_counts")
    t = SelectTables(np.diff(offsets_host), groups, scores.device)
    return counts_from_tables(scores.contiguous(), t, keep.to(scores.device))


def select_keep_counts_reference(scores: torch.Tensor, offsets: torch.Tensor, keep: torch.Tensor, *,
                                 groups=None) -> torch.Tensor:
    """Plain-torch select_keep_counts: per group, stable sort by score descending, take the top M, count."""
    offsets_host, groups, keep = _check(scores, offsets, keep, groups)
    nl = offsets_host.size - 1
    out = torch.zeros((keep.shape[0], nl), dtype=torch.int64)
    s = scores.detach().cpu()
    for g, (l0, l1) in enumerate(zip(groups[:-1], groups[1:])):
        a, b = int(offsets_host[l0]), int(offsets_host[l1])
        # The flat order is already (layer, rank) ascending, so a stable descending sort by score
        # is the total order.
        order = torch.sort(s[a:b], descending=True, stable=True).indices + a
        layer_of = torch.bucketize(order, torch.from_numpy(offsets_host[1:]), right=True)
        for r, m in enumerate(keep[:, g].cpu().tolist()):
            out[r] += torch.bincount(layer_of[:m], minlength=nl)
    return out.to(scores.device)


def launch_configs() -> list[LaunchConfig]:
    """What select_keep_counts and the GPU plan (with its cuts) launch on a GPU: one
    configuration each whatever the layer count."""
    i64, f32, f64 = pointer(torch.int64), pointer(torch.float32), pointer(torch.float64)
    types = dict(keys_ptr=i64, offsets_ptr=i64, groups_ptr=i64, keep_ptr=i64, out_ptr=i64, lo_ptr=i64,
                 hi_ptr=i64, pos_ptr=i64, mags_ptr=f32, cut_ptr=f32, host_ptr=f64,
                 split_ptr=pointer(torch.int32), G="i32", L="i32", R="i32")
    return [LaunchConfig.of(_keep_counts, f"select _keep_counts RADIX_BITS={_RADIX_BITS} BLOCK_L={_GPU_LAYERS}"
                            f"{' CUTS' if cuts else ''}", types,
                            dict(ROUNDS=_ROUNDS, RADIX_BITS=_RADIX_BITS, RADIX=1 << _RADIX_BITS,
                                 BLOCK_L=_GPU_LAYERS, CUTS=cuts), _WARPS)
            for cuts in (False, True)]
