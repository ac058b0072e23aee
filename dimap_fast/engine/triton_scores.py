"""GPU path of the Plan: a short, fixed sequence of launches whatever the layer count.

Planning: every layer's |w| copied once into one float32 buffer in slot order (kept: the masks
are cut from it), each run of consecutive equal-size layers sorted by one batched torch.sort
straight into the sorted buffer (values only kept), one read of each layer's largest magnitude
(the non-finite check), and the three score launches of dimap_fast.kernels.importance over every
layer at once. Layers are laid out group by group (a DIMAP module, or every layer for
``global``), natural order inside a group, so one selection launch serves every (ratio, group).

A ratio: one selection launch, which also gathers each layer's cut magnitude and key, and ONE
copy of those to the host (``to_host``, the only device-to-host read of this path); the masks
are then written by the apply kernels in one pass over that |w| buffer, from the cuts still on
the device (rebuilt first if a weight changed in place since planning, so the masks are those
of the weights as they are, like the CPU plan's). GPU memory is plentiful next to the CPU's, so
every score is kept (float64) instead of block heads, and |w| (float32) beside it. On CPU
tensors this runs under TRITON_INTERPRET=1, which is how the tests exercise it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .prunable import non_finite_error, prune_count, weight_version
from .units import UnitLayer

_CACHED_RATIOS = 64


def to_host(t: torch.Tensor) -> np.ndarray:
    """The one device-to-host read of the GPU plan (tests and the cost model count its calls)."""
    return t.cpu().numpy()


class TritonScorer:
    def __init__(self, layers: list[UnitLayer], method: str):
        from ..kernels.importance import ScoreTables, scores_from_tables
        from ..kernels.select import SelectTables

        self.method = method
        self.units = layers
        self.numels = np.array([u.numel for u in layers], dtype=np.int64)
        if method == "dimap":
            members: dict[str, list[int]] = {}
            for i, u in enumerate(layers):
                members.setdefault(u.module, []).append(i)
            parts = list(members.values())
        elif method == "global":
            parts = [list(range(len(layers)))]
        else:
            parts = [[i] for i in range(len(layers))]
        self.order = np.array([i for part in parts for i in part], dtype=np.int64)  # flat slot -> layer
        self.slot = np.empty_like(self.order)
        self.slot[self.order] = np.arange(self.order.size)  # layer -> flat slot
        sizes = self.numels[self.order]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        bounds = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        self.group_sizes = self.offsets[bounds[1:]] - self.offsets[bounds[:-1]]
        self.device = layers[0].values.device
        self._abs = _magnitudes([layers[i] for i in self.order])
        self._versions, self._planned = self._weight_versions(), True  # _abs is what mags sorts
        self.sizes = sizes
        self.mags = sorted_by_layer(self._abs, sizes, self.offsets)
        firsts = to_host(self.mags[torch.from_numpy(self.offsets[:-1]).to(self.device, non_blocking=True)])
        for slot in np.flatnonzero(~np.isfinite(firsts)):  # torch sorts NaN above +inf: the first tells
            raise non_finite_error(layers[self.order[slot]].name, float(firsts[slot]))
        if method == "dimap":
            self.keys = scores_from_tables(self.mags, ScoreTables(sizes, self.device))
        else:
            self.keys = self.mags.double()
        self._select = SelectTables(sizes, bounds, self.device) if method != "uniform" else None
        self._starts = torch.from_numpy(self.offsets[:-1]).to(self.device, non_blocking=True)
        self._cuts: dict[float, tuple] = {}  # ratio -> (host counts, mags, keys by layer; device counts, cuts,
        # split flags or None, by slot)
        self._apply = None  # the apply kernels' block table, built at the first masks()

    def keep_counts(self, ratio: float) -> np.ndarray:
        return self.keep_counts_many([ratio])[0]

    def keep_counts_many(self, ratios) -> np.ndarray:
        """[R, L] keep counts: one selection launch for every ratio and group, one host read."""
        ratios = list(ratios)
        todo = list(dict.fromkeys(r for r in ratios if r not in self._cuts))
        if todo:
            self._cut(todo)
        return np.stack([self._cuts[r][0] for r in ratios]) if ratios else np.zeros((0, len(self.units)), np.int64)

    def _cut(self, ratios: list[float]) -> None:
        from ..kernels.select import cuts_from_tables

        if self.method == "uniform":
            counts = np.array([[n - prune_count(r, n) for n in self.numels[self.order]] for r in ratios], dtype=np.int64)
            counts_dev = torch.from_numpy(counts).to(self.device, non_blocking=True)
            at = self._starts + (counts_dev - 1).clamp_min(0)
            mags, keys = self.mags[at], self.keys[at]
            cuts = torch.where(counts_dev > 0, mags, torch.full_like(mags, math.inf))
            host = to_host(torch.stack([counts_dev.double(), mags.double(), keys]))  # exact: counts < 2^53
            split = [None] * len(ratios)  # every layer's ties counted
        else:  # the selection launch writes the cuts and the host's copy too
            keep = np.array([[g - prune_count(r, int(g)) for g in self.group_sizes] for r in ratios], dtype=np.int64)
            counts_dev, cuts, host, split = cuts_from_tables(self.keys, self.mags, self._select,
                                                      torch.from_numpy(keep).to(self.device, non_blocking=True))
            host = to_host(host)
        if len(self._cuts) + len(ratios) > _CACHED_RATIOS:
            self._cuts.clear()
        for r, ratio in enumerate(ratios):
            by_layer = host[:, r, self.slot]
            self._cuts[ratio] = (by_layer[0].astype(np.int64), by_layer[1], by_layer[2], counts_dev[r], cuts[r],
                                 split[r])

    def magnitude_at(self, i: int, rank: int) -> float:
        for counts, mags, *_ in self._cuts.values():
            if counts[i] - 1 == rank:
                return float(mags[i])
        return float(to_host(self.mags[int(self.offsets[self.slot[i]]) + rank]))

    def key_at(self, i: int, rank: int) -> float:
        for counts, _, keys, *_ in self._cuts.values():
            if counts[i] - 1 == rank:
                return float(keys[i])
        return float(to_host(self.keys[int(self.offsets[self.slot[i]]) + rank]))

    def masks(self, ratio: float) -> dict[str, torch.Tensor]:
        """Every layer's mask from the ratio's cuts on the device: one apply pass over |w|."""
        from ..kernels.apply import cut_from_tables, default_tables

        self.keep_counts(ratio)
        counts_dev, cuts, split = self._cuts[ratio][3:]
        if self._apply is None:
            self._apply = default_tables(self.numels[self.order], self.device)
        if self._weight_versions() != self._versions:
            # |w| no longer the one sorted: every layer's ties are counted (``split`` is of the sort)
            self._abs = _magnitudes([self.units[i] for i in self.order])
            self._versions, self._planned = self._weight_versions(), False
        mask, _ = cut_from_tables(self._abs, self._apply, cuts, counts_dev, zero=False, count=False,
                                  split=split if self._planned else None)
        out = {}
        for slot, i in enumerate(self.order):
            u, start = self.units[i], int(self.offsets[slot])
            out[u.name] = mask[start : start + u.numel].view(u.values.shape)
        return out

    def sort_again(self) -> torch.Tensor:
        """The plan's sort calls alone, once more, on its |w| buffer: what the GPU check times
        beside the static model's estimate of them."""
        return sorted_by_layer(self._abs, self.sizes, self.offsets)

    def _weight_versions(self) -> list[int]:
        return [weight_version(u.values) for u in self.units]


def _magnitudes(layers: list[UnitLayer]) -> torch.Tensor:
    """The layers' |w| as float32, concatenated: one copy and one abs for every layer at once."""
    flat = torch.cat([u.values.detach().reshape(-1) for u in layers])
    if flat.dtype != torch.float32:
        flat = flat.float()  # float16 / bfloat16 widen exactly
    return flat.abs_()


def sorted_by_layer(flat: torch.Tensor, sizes: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
    """``flat`` (layers of ``sizes`` at ``offsets``) sorted descending within each layer: one
    batched sort per run of consecutive equal-size layers, written in place of the run's rows so
    nothing is concatenated afterwards.

    torch.sort, though it carries int64 indices: a keys-only Triton radix sort (3 passes of 11
    bits) needs a stable rank of each key within its chunk, and every way Triton offers (tl.sort,
    one-hot cumsums, tile compares) compiled to 200-900 sm_90 instructions per key, ~13 ms for
    Swin-B against ~2.8 ms for torch.sort (static estimates, H100).
    """
    out = torch.empty_like(flat)
    edges = np.concatenate([[0], np.flatnonzero(np.diff(sizes)) + 1, [sizes.size]])
    runs = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if a < b and sizes[a] > 0]
    longest = max((int(offsets[b] - offsets[a]) for a, b in runs), default=0)
    indices = torch.empty(longest, dtype=torch.int64, device=flat.device)  # torch.sort's, unused
    for a, b in runs:
        lo, hi, shape = int(offsets[a]), int(offsets[b]), (b - a, int(sizes[a]))
        torch.sort(flat[lo:hi].view(shape), dim=1, descending=True,
                   out=(out[lo:hi].view(shape), indices[: hi - lo].view(shape)))
    return out
