"""DIMAP / LAMP scores of many layers at once: sq_j / S_j per layer, in float64.

S_j, the float64 sum of a layer's squares up to rank j, has one summation order, shared bit for
bit with the CPU plan (dimap_fast.engine.scores), so the two paths cut at the same weights even where a
score sits within an ulp of a threshold. Ranks fall in runs of ``RUN`` and runs in groups
of ``GROUP``; every sum runs left to right: p_j the squares of j's run up to j, T_k a run's
total, q_k the totals of the earlier runs of its group, U_g a group's total, R_g the U of the
layer's earlier groups, and S_j = R_g + (q_k + p_j). S never decreases along the ranks (at a
run's end q_k + T_k is q_{k+1}, at a group's end R_g + U_g is R_{g+1}), so scores never rise.

Three launches whatever the layer count, over layer-aligned groups (a group never crosses a layer):
1. ``_group_sums``: a program per group, a lane per run summing its 64 squares in order; then
   q by a left-to-right pass over the lanes, and U.
2. ``_layer_tops``: a program per layer, R by a left-to-right pass over its groups' U.
3. ``_group_scores``: the run sums again, S = R + (q + p), the score.
A left-to-right pass over lanes extracts one lane at a time with a masked sum: adding zeros to
one value is exact, so the order stays the one above.
"""

from __future__ import annotations

import numpy as np
import torch

from ._common import (
    FLOAT_DTYPES,
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

RUN = 64  # ranks per run: part of the summation order (dimap_fast.engine.scores uses it too)
GROUP = 64  # runs per group: part of the summation order (dimap_fast.engine.scores uses it too)
_GROUP_WARPS = 2  # a lane per run: 64 lanes
_TOPS_CHUNK = 64
_INTERP_TOPS_CHUNK = 8  # the interpreter pays per operation: fewer lanes, same order


@triton.jit
def _group_sums(mags_ptr, offsets_ptr, grp_layer_ptr, grp_start_ptr, q_ptr, u_ptr,
                RUN: tl.constexpr, GROUP: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(grp_layer_ptr + pid)
    start = tl.load(grp_start_ptr + pid)
    end = tl.load(offsets_ptr + layer + 1)
    lane = tl.arange(0, GROUP)
    base = start + lane.to(tl.int64) * RUN
    total = tl.zeros((GROUP,), tl.float64)
    for i in range(RUN):
        idx = base + i
        x = tl.load(mags_ptr + idx, mask=idx < end, other=0.0).to(tl.float64)
        total = total + x * x  # the square is exact (24-bit mantissas), so a fused add is too
    run = tl.zeros((), tl.float64)
    q = tl.zeros((GROUP,), tl.float64)
    for k in range(GROUP):
        q = tl.where(lane == k, run, q)
        run = run + tl.sum(tl.where(lane == k, total, 0.0), 0)
    tl.store(q_ptr + pid * GROUP + lane, q)
    tl.store(u_ptr + pid, run)


@triton.jit
def _layer_tops(u_ptr, grp_off_ptr, r_ptr, CHUNK: tl.constexpr):
    layer = tl.program_id(0)
    g0 = tl.load(grp_off_ptr + layer)
    g1 = tl.load(grp_off_ptr + layer + 1)
    lane = tl.arange(0, CHUNK)
    acc = tl.zeros((), tl.float64)
    for c0 in range(g0, g1, CHUNK):
        g = c0 + lane
        ok = g < g1
        u = tl.load(u_ptr + g, mask=ok, other=0.0)
        r = tl.zeros((CHUNK,), tl.float64)
        for k in range(CHUNK):
            r = tl.where(lane == k, acc, r)
            acc = acc + tl.sum(tl.where(lane == k, u, 0.0), 0)
        tl.store(r_ptr + g, r, mask=ok)


@triton.jit
def _group_scores(mags_ptr, offsets_ptr, grp_layer_ptr, grp_start_ptr, q_ptr, r_ptr, out_ptr,
                  RUN: tl.constexpr, GROUP: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(grp_layer_ptr + pid)
    start = tl.load(grp_start_ptr + pid)
    end = tl.load(offsets_ptr + layer + 1)
    lane = tl.arange(0, GROUP)
    base = start + lane.to(tl.int64) * RUN
    q = tl.load(q_ptr + pid * GROUP + lane)
    top = tl.load(r_ptr + pid)
    p = tl.zeros((GROUP,), tl.float64)
    for i in range(RUN):
        idx = base + i
        ok = idx < end
        x = tl.load(mags_ptr + idx, mask=ok, other=0.0).to(tl.float64)
        sq = x * x
        p = p + sq
        s = top + (q + p)
        # An all-zero prefix scores 0, never 0/0.
        score = tl.where(s > 0.0, sq / tl.where(s > 0.0, s, 1.0), 0.0)
        tl.store(out_ptr + idx, score, mask=ok)


class ScoreTables:
    """The group table of some layer sizes, built on the host once (no device reads) and kept."""

    def __init__(self, sizes, device, run: int = RUN, group: int = GROUP):
        sizes = np.asarray(sizes, dtype=np.int64)
        span = run * group
        ngroups = -(-sizes // span)
        grp_off = np.zeros(sizes.size + 1, dtype=np.int64)
        np.cumsum(ngroups, out=grp_off[1:])
        offsets = np.zeros(sizes.size + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        layer = np.repeat(np.arange(sizes.size), ngroups)
        start = offsets[layer] + (np.arange(layer.size) - grp_off[layer]) * span
        self.run, self.group, self.n, self.groups = run, group, int(offsets[-1]), int(layer.size)
        self.layers = int(sizes.size)
        put = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
        self.offsets, self.grp_layer = put(offsets), put(layer.astype(np.int32))
        self.grp_start, self.grp_off = put(start), put(grp_off)


def scores_from_tables(mags: torch.Tensor, t: ScoreTables) -> torch.Tensor:
    """module_scores without the checks: ``t`` was built for ``mags``' layer sizes."""
    dev = mags.device
    q = torch.empty(t.groups * t.group, dtype=torch.float64, device=dev)
    u = torch.empty(t.groups, dtype=torch.float64, device=dev)
    r = torch.empty_like(u)
    out = torch.empty(t.n, dtype=torch.float64, device=dev)
    chunk = _INTERP_TOPS_CHUNK if interpreting(_layer_tops) else _TOPS_CHUNK
    with device_guard(dev):
        _group_sums[(t.groups,)](mags, t.offsets, t.grp_layer, t.grp_start, q, u, RUN=t.run,
                                 GROUP=t.group, num_warps=_GROUP_WARPS)
        _layer_tops[(t.layers,)](u, t.grp_off, r, CHUNK=chunk, num_warps=1)
        _group_scores[(t.groups,)](mags, t.offsets, t.grp_layer, t.grp_start, q, r, out,
                                   RUN=t.run, GROUP=t.group, num_warps=_GROUP_WARPS)
    return out


def module_scores(mags: torch.Tensor, offsets: torch.Tensor, *, order: tuple[int, int] = (RUN, GROUP)
                  ) -> torch.Tensor:
    """Float64 score sq_j / S_j of every weight, layers given rank-sorted descending.

    ``order``: (run, group) of the summation order; only tests change it, to reach several
    groups with few weights.
    """
    check_1d(mags, "mags", FLOAT_DTYPES, "float32, float16 or bfloat16")
    offsets_host = check_offsets(offsets, mags.numel())
    check_runnable(_group_scores, mags.device, "module_scores")
    run, group = _check_order(order)
    sizes = np.diff(offsets_host.numpy())
    return scores_from_tables(mags.contiguous(), ScoreTables(sizes, mags.device, run, group))


def module_scores_reference(mags: torch.Tensor, offsets: torch.Tensor, *,
                            order: tuple[int, int] = (RUN, GROUP)) -> torch.Tensor:
    """Plain-torch module_scores: each level of the summation order as a left-to-right cumsum."""
    check_1d(mags, "mags", FLOAT_DTYPES, "float32, float16 or bfloat16")
    offsets_host = check_offsets(offsets, mags.numel()).tolist()
    run, group = _check_order(order)
    out = torch.empty(mags.numel(), dtype=torch.float64, device=mags.device)
    for a, b in zip(offsets_host[:-1], offsets_host[1:]):
        sq = mags[a:b].detach().cpu().to(torch.float64) ** 2
        nb = -(-sq.numel() // run)
        ng = -(-nb // group)
        p = torch.zeros(ng * group * run, dtype=torch.float64)
        p[: sq.numel()] = sq
        p = torch.cumsum(p.view(ng * group, run), 1)
        totals = p[:, -1].reshape(ng, group)
        q = torch.zeros_like(totals)
        q[:, 1:] = torch.cumsum(totals[:, :-1], 1)
        tops = torch.zeros(ng, dtype=torch.float64)
        tops[1:] = torch.cumsum(torch.cumsum(totals, 1)[:, -1], 0)[:-1]
        s = tops.repeat_interleave(group * run).view(-1, run) + (q.reshape(-1, 1) + p)
        s = s.reshape(-1)[: sq.numel()]
        out[a:b] = torch.where(s > 0, sq / torch.where(s > 0, s, torch.ones_like(s)), 0.0).to(out.device)
    return out


def _check_order(order) -> tuple[int, int]:
    run, group = (int(v) for v in order)
    for v in (run, group):
        if v < 1 or v & (v - 1):
            raise ValueError(f"order must be two positive powers of two, got {tuple(order)}")
    return run, group


def launch_configs() -> list[LaunchConfig]:
    """What module_scores launches on a GPU (the engine always uses the shared order)."""
    f64, i64 = pointer(torch.float64), pointer(torch.int64)
    table = dict(offsets_ptr=i64, grp_layer_ptr=pointer(torch.int32), grp_start_ptr=i64)
    order = dict(RUN=RUN, GROUP=GROUP)
    out = [LaunchConfig.of(_layer_tops, f"importance _layer_tops CHUNK={_TOPS_CHUNK}",
                           dict(u_ptr=f64, grp_off_ptr=i64, r_ptr=f64), dict(CHUNK=_TOPS_CHUNK), 1)]
    for dtype in FLOAT_DTYPES:
        mags = pointer(dtype)
        label = f"{mags[1:]} RUN={RUN} GROUP={GROUP}"
        out.append(LaunchConfig.of(_group_sums, f"importance _group_sums {label}",
                                   dict(table, mags_ptr=mags, q_ptr=f64, u_ptr=f64), order, _GROUP_WARPS))
        out.append(LaunchConfig.of(_group_scores, f"importance _group_scores {label}",
                                   dict(table, mags_ptr=mags, q_ptr=f64, r_ptr=f64, out_ptr=f64),
                                   order, _GROUP_WARPS))
    return out
