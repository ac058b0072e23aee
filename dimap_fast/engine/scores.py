"""The DIMAP score (the paper's Eq. 10) on the CPU, and the exact module threshold.

For each prunable layer, with magnitudes sorted descending (ties by flat index, a stable sort),

    Imp(w_j) = w_j^2 / (w_1^2 + ... + w_j^2)

with the prefix sum accumulated in float64, and 0 where the prefix is 0. Inside a layer the score
never increases along the ranks, so at any threshold a layer keeps a prefix of its ranks: a
magnitude cutoff plus a count. That is what lets a ratio be cut without a per-weight argsort.

The float64 prefix has one summation order, shared bit for bit with the GPU kernels
(dimap_fast.kernels.importance), so CUDA and CPU masks agree even where a score sits within an ulp
of a threshold. Ranks fall in runs of ``RUN`` and runs in groups of ``GROUP``; every sum
below runs left to right:
- p_j: the squares of j's run up to j;  T_k: run k's total (p at its last rank);
- q_k: the totals of the earlier runs of k's group;  U_g: all totals of group g;
- R_g: the U of the layer's earlier groups;  S_j = R_g + (q_k + p_j).
S never decreases along the ranks (at a run's end q_k + T_k is q_{k+1}, at a group's end
R_g + U_g is R_{g+1}), and every level is short or parallel on a GPU.

Memory is the constraint that shapes this file: holding every score in float64 would take twice
the model's prunable weights. A layer keeps only its sorted magnitudes (float32), q per run,
R per group and the key at each run's first rank (its head). A ratio's threshold is found on
those heads, and exact keys are recomputed only for the few runs that straddle it.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np
import torch

from ..kernels.importance import GROUP, RUN
from .prunable import non_finite_error, prune_count
from .sorting import sort_negated
from .units import UnitLayer

# RUN ranks per run (16 bytes of heads per 64 weights, a narrow band to recompute per ratio) and GROUP
# runs per group define the summation order: one home, the kernels' (the GPU plan sums the same way).
CHUNK = 1 << 18  # elements per float64 pass (whole groups): few Python calls leave the GIL free


class LayerState:
    """What a layer keeps between ratios: sorted magnitudes and its run heads."""

    __slots__ = ("neg", "prefix", "tops", "heads_neg", "numel", "method", "squared")

    def __init__(self, neg: np.ndarray, method: str, squared: bool = False):
        self.neg = neg  # -|w| ascending, i.e. |w| descending with the sign flipped: numpy sorts ascending only
        self.numel = neg.size
        self.method = method
        self.squared = squared  # neg holds -energy (structured units) rather than -|w|
        if method == "dimap":
            self.prefix, self.tops, heads = _dimap_heads(neg, squared)
        else:
            self.prefix = self.tops = None
            heads = -neg[::RUN].astype(np.float64)
        self.heads_neg = -heads  # ascending, for searchsorted

    def keys(self, r0: int, r1: int) -> np.ndarray:
        """Exact keys of ranks [r0, r1); r0 must start a run."""
        return band_keys([self], [r0], np.array([r1 - r0]))

    def key_at(self, rank: int) -> float:
        start = rank - rank % RUN
        return float(self.keys(start, rank + 1)[-1])

    def magnitude_at(self, rank: int) -> float:
        return float(-self.neg[rank])

    def nbytes(self) -> int:
        extra = 0 if self.prefix is None else self.prefix.nbytes + self.tops.nbytes
        return self.neg.nbytes + self.heads_neg.nbytes + extra


def sorted_negated_magnitudes(tensor: torch.Tensor) -> np.ndarray:
    """-|w| sorted ascending as float32 (exact for fp16 and bf16 too; float64 stays float64)."""
    flat = tensor.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    source = flat.cpu().numpy()
    bits = np.uint32 if source.dtype == np.float32 else np.uint64
    out = np.empty_like(source)
    # -|w| is w with its sign bit set: one pass instead of abs then negate (NaN stays NaN)
    np.bitwise_or(source.view(bits), bits(1) << bits(8 * source.itemsize - 1), out=out.view(bits))
    sort_negated(out)
    return out


def band_keys(states: list[LayerState], starts, lengths: np.ndarray) -> np.ndarray:
    """The exact keys of ranks [starts[i], starts[i] + lengths[i]) of each layer, concatenated
    (each start begins a run): S = R + (q + p), each run's squares summed left to right. One
    cumsum serves every band: a budget's search asks for all layers' bands at each ratio."""
    if not states or states[0].method != "dimap":
        return np.concatenate([-s.neg[a:a + n].astype(np.float64) for s, a, n in zip(states, starts, lengths)])
    runs = -(-lengths // RUN)
    squares = np.zeros((int(runs.sum()), RUN))
    valid = np.zeros(squares.shape, dtype=bool)
    q, r = np.empty(squares.shape[0]), np.empty(squares.shape[0])
    row = 0
    for s, a, n, k in zip(states, starts, lengths, runs):
        band, flat = s.neg[a:a + n], slice(row * RUN, row * RUN + n)
        squares.reshape(-1)[flat] = -band if s.squared else np.square(band, dtype=np.float64)
        valid.reshape(-1)[flat] = True
        q[row:row + k] = s.prefix[a // RUN:a // RUN + k]
        r[row:row + k] = s.tops[np.arange(a // RUN, a // RUN + k) // GROUP]
        row += k
    p = torch.cumsum(torch.from_numpy(squares), 1).numpy()  # left to right, as numpy's
    total = np.add(q[:, None], p, out=p)
    total = np.add(r[:, None], total, out=total)
    return _safe_divide(squares[valid], total[valid])


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _dimap_heads(neg: np.ndarray, squared: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per run q and its head's score, per group R (see the module docstring).

    Large chunks keep the Python calls (which hold the GIL) rare, so the layer workers run side by
    side; element-wise work stays in numpy because torch's would start its own threads and fight
    the workers. The in-run sums are torch's cumsum: left to right like numpy's (bit-identical)
    and measured 3x faster here.
    """
    n = neg.size
    nruns = -(-n // RUN)
    ngroups = -(-nruns // GROUP)
    q = np.zeros(ngroups * GROUP)
    heads = np.empty(nruns)
    tops = np.empty(ngroups)
    size = min(CHUNK, ngroups * GROUP * RUN)
    squares = np.zeros(size)
    squares_t = torch.from_numpy(squares).view(-1, RUN)
    sums_t = torch.empty_like(squares_t)
    totals = np.zeros(size // RUN)
    carry = 0.0
    for start in range(0, n, CHUNK):  # CHUNK is a multiple of GROUP * RUN: chunks start groups
        stop = min(start + CHUNK, n)
        m = stop - start
        if squared:
            np.negative(neg[start:stop], out=squares[:m], dtype=np.float64)
        else:
            np.square(neg[start:stop], out=squares[:m], dtype=np.float64)
        squares[m:] = 0.0
        mb = -(-m // RUN)
        mg = -(-mb // GROUP)
        torch.cumsum(squares_t[:mb], 1, out=sums_t[:mb])
        totals[:mb] = sums_t[:mb, -1].numpy()
        totals[mb : mg * GROUP] = 0.0
        groups = totals[: mg * GROUP].reshape(mg, GROUP)
        b0, g0 = start // RUN, start // (RUN * GROUP)
        q_chunk = q[b0 : b0 + mg * GROUP].reshape(mg, GROUP)
        np.cumsum(groups[:, :-1], axis=1, out=q_chunk[:, 1:])
        group_totals = np.cumsum(groups, axis=1)[:, -1]
        run = np.empty(mg + 1)
        run[0] = carry
        run[1:] = group_totals
        np.cumsum(run, out=run)  # R continues left to right across chunks
        tops[g0 : g0 + mg] = run[:-1]
        carry = float(run[-1])
        first = squares[0:m:RUN]
        s = tops[g0 + np.arange(mb) // GROUP] + (q[b0 : b0 + mb] + first)
        heads[b0 : b0 + mb] = _safe_divide(first, s)
    return q[:nruns], tops, heads


def _check_finite(name: str, neg: np.ndarray) -> None:
    # numpy sorts NaN last, the bit sort first, -inf comes first: three reads, not an isfinite pass
    bad = neg[-1] if np.isnan(neg[-1]) else neg[0]
    if not np.isfinite(bad):
        raise non_finite_error(name, float(bad if np.isnan(bad) else -bad))


def build_states(tensors: list[torch.Tensor], method: str, progress=None, names=None, squared=False,
                 groups: list[list[int]] | None = None) -> tuple[list[LayerState], list["ThresholdGroup"]]:
    """Sort and summarize every layer over all cores (numpy releases the GIL); build each group.

    Groups are listed largest first and their layers run in that order, so a group's selection
    structure is built, ahead of any waiting layer, as soon as its last layer is done: that keeps
    the other core sorting instead of leaving the group work for a single thread at the end.
    """
    groups = groups or []
    order = sorted(range(len(groups)), key=lambda g: -sum(tensors[i].numel() for i in groups[g]))
    grouped = [i for g in order for i in sorted(groups[g], key=lambda i: -tensors[i].numel())]
    seen = set(grouped)
    rest = sorted((i for i in range(len(tensors)) if i not in seen), key=lambda i: -tensors[i].numel())
    pending_layers = deque(grouped + rest)
    owner = {i: g for g, members in enumerate(groups) for i in members}
    missing = [len(members) for members in groups]
    states: list[LayerState | None] = [None] * len(tensors)
    built: list[ThresholdGroup | None] = [None] * len(groups)

    def layer(i):
        neg = sorted_negated_magnitudes(tensors[i])
        _check_finite(names[i] if names else f"layer {i}", neg)
        states[i] = LayerState(neg, method, squared)

    def group(g):
        built[g] = ThresholdGroup([states[i] for i in groups[g]])

    workers = max(1, min(len(tensors), torch.get_num_threads(), os.cpu_count() or 1))
    ready: deque = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        running = {}
        while pending_layers or ready or running:
            while len(running) < workers and (ready or pending_layers):
                if ready:
                    g = ready.popleft()
                    running[pool.submit(group, g)] = ("group", g)
                else:
                    i = pending_layers.popleft()
                    running[pool.submit(layer, i)] = ("layer", i)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                kind, j = running.pop(future)
                future.result()  # a non-finite layer stops the run here
                if kind == "layer":
                    if progress is not None:
                        progress.update(tensors[j].numel())
                    if j in owner:
                        missing[owner[j]] -= 1
                        if missing[owner[j]] == 0:
                            ready.append(owner[j])
    return states, built  # type: ignore[return-value]


class ThresholdGroup:
    """Layers that share one threshold (a module for dimap, everything for global).

    The run heads of all its layers, sorted descending once, bound how many weights lie at or
    above any value: a run whose head is >= t holds at least its first weight above t, and no
    weight after a head < t is >= t. Those bounds bracket a ratio's exact threshold between two
    head values; only the runs in between are recomputed.
    """

    def __init__(self, states: list[LayerState]):
        self.states = states
        self.numels = np.array([s.numel for s in states], dtype=np.int64)
        self.total = int(self.numels.sum())
        self.neg_values = np.concatenate([s.heads_neg for s in states])
        self.neg_values.sort()  # ascending
        # Every run counts RUN at most and at least, except a layer's last run (smaller at
        # most) and its first (1 at least). Those few corrections go to the start of their value's
        # tie group: the cumulative counts are then exact at every tie group's end, which is all
        # _bracket reads (it works on whole tie groups).
        n = self.neg_values.size
        full = np.arange(RUN, (n + 1) * RUN, RUN, dtype=np.int64)
        short_last = [(s.heads_neg[-1], RUN * s.heads_neg.size - s.numel) for s in states]
        # Read at each tie group's end: inside a group a correction can pull a count below the
        # previous group's, and _bracket's binary searches need counts that never fall.
        ends = np.searchsorted(self.neg_values, self.neg_values, side="right") - 1
        self.cum_hi = _corrections(self.neg_values, full, short_last)[ends]
        self.cum_lo = _corrections(self.neg_values, full, [(s.heads_neg[0], RUN - 1) for s in states])[ends]

    def keep_counts(self, keep: int) -> np.ndarray:
        """Per layer, how many top ranks stay so that exactly ``keep`` weights stay in the group.

        Order: key descending, then layer (earlier layers keep their ties first), then rank.
        """
        if keep >= self.total:
            return self.numels.copy()
        if keep <= 0:
            return np.zeros_like(self.numels)
        lower, upper = self._bracket(keep)
        starts, stops = [], []
        for s in self.states:
            above = int(np.searchsorted(s.heads_neg, -upper, side="right"))  # heads >= upper
            at_least = int(np.searchsorted(s.heads_neg, -lower, side="right"))  # heads >= lower
            starts.append(max(above - 1, 0) * RUN)
            stops.append(min(at_least * RUN, s.numel))
        lengths = np.array(stops, dtype=np.int64) - np.array(starts, dtype=np.int64)
        need = keep - sum(starts)
        counts = np.array(starts, dtype=np.int64)
        if need > 0:
            band = band_keys(self.states, starts, lengths)
            chosen = np.argsort(-band, kind="stable")[:need]
            owner = np.repeat(np.arange(len(lengths)), lengths)
            counts += np.bincount(owner[chosen], minlength=len(lengths))
        return counts

    def _bracket(self, keep: int) -> tuple[float, float]:
        """Head values lower <= t* < upper around the keep-th largest key t*."""
        n = self.neg_values.size
        j = int(np.searchsorted(self.cum_lo, keep, side="left"))
        lower = -float(self.neg_values[j]) if j < n else -np.inf
        j = int(np.searchsorted(self.cum_hi, keep, side="left")) - 1
        if j >= 0:
            v = self.neg_values[j]
            end = int(np.searchsorted(self.neg_values, v, side="right")) - 1
            if end != j:  # the tie group runs past j: its count may reach keep
                j = int(np.searchsorted(self.neg_values, v, side="left")) - 1
        upper = -float(self.neg_values[j]) if j >= 0 else np.inf
        return lower, upper


def _corrections(neg_values: np.ndarray, full: np.ndarray, items: list[tuple[float, int]]) -> np.ndarray:
    """full minus the running sum of amounts, each placed at the start of its value's tie group."""
    out = np.zeros(neg_values.size, dtype=np.int64)
    values = np.array([v for v, _ in items])
    amounts = np.array([a for _, a in items], dtype=np.int64)
    np.add.at(out, np.searchsorted(neg_values, values, side="left"), amounts)
    np.cumsum(out, out=out)
    return np.subtract(full, out, out=out)


class NumpyScorer:
    """CPU path: numpy sorts and sums (both cores), then exact selection on run heads."""

    def __init__(self, units: list[UnitLayer], method: str, bar=None):
        self.method = method
        squared = bool(units) and units[0].squared
        if method == "dimap":
            members = [[i for i, u in enumerate(units) if u.module == m] for m in dict.fromkeys(u.module for u in units)]
        elif method == "global":
            members = [list(range(len(units)))]
        else:
            members = []
        values = [u.values for u in units]
        self.states, built = build_states(values, method, bar, [u.name for u in units], squared, members)
        self.groups: list[tuple[list[int], ThresholdGroup]] = list(zip(members, built))

    def keep_counts(self, ratio: float) -> np.ndarray:
        if self.method == "uniform":
            return np.array([s.numel - prune_count(ratio, s.numel) for s in self.states], dtype=np.int64)
        counts = np.zeros(len(self.states), dtype=np.int64)
        for idx, group in self.groups:
            counts[idx] = group.keep_counts(group.total - prune_count(ratio, group.total))
        return counts

    def magnitude_at(self, i: int, rank: int) -> float:
        return self.states[i].magnitude_at(rank)

    def key_at(self, i: int, rank: int) -> float:
        return self.states[i].key_at(rank)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.states)
