"""Pruning to a FLOPs budget: the smallest ratio whose pruned model removes a given share of the FLOPs.

FLOPs are counted as ``dimap_fast.report`` counts them. Unstructured and block: a zeroed prunable
weight is removed from the layer that holds it. Channel: the FLOPs of the smaller model
``dimap_fast.shrink`` builds: its neuron widths rounded up to multiples of 8, and per removed head
the q, k, v and output Linears, the attention matmuls and (SwinV2) the position-bias MLP's output
rows that head had, read from the architecture adapter's groups. 2:4 always removes half of every prunable weight: nothing to search.

What does not depend on the ratio is measured once: the positions (tokens) every layer sees, from one
forward pass on the meta device (per input size), and, per unit layer, what its top-c units leave for
every c (nonzero weights, or the width shrink() keeps). A ratio then costs one ``keep_counts`` and a
dot product. Keep counts never grow with the ratio, so neither do the FLOPs left: the smallest ratio
is found by bisection, down to adjacent floats. The keep counts follow from each module's
round(ratio x size) alone, so ratios that give the same rounded sizes are evaluated once.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..arch import find_adapter
from .values import Pattern
from ..errors import DimapError
from .flops import pruned_macs, share_removed, tally, workload
from .prunable import prune_count

MLP_ALIGN = 8  # shrink()'s default: its MLP widths are multiples of 8 (zero-output neurons fill up)
LAST_RATIO = math.nextafter(1.0, 0.0)  # the largest ratio: every module loses all its units


def check_budget_pattern(pattern) -> None:
    """Refuse a FLOPs budget for a pattern (a Pattern or its name) that removes a fixed share."""
    value = Pattern.parse(pattern)
    if value.fraction is not None:
        share = "half" if value.fraction == 0.5 else f"{value.fraction:g}"
        raise DimapError(f"pattern {value.name!r} removes {share} of every prunable weight, a fixed share of the FLOPs: "
                         f"prune it at ratio {value.fraction:g} instead of asking for a FLOPs reduction")


def flops_metadata(plan, target: float, ratio: float) -> dict[str, str]:
    """What an output pruned to a FLOPs reduction records beside its ratio."""
    return {"flops_reduction_target": repr(target), "flops_reduction": repr(plan.flops_reduction(ratio))}


class Kept:
    """Per unit layer, what its top-c units leave, for every c: nonzero weights (unstructured,
    block) or the width shrink() builds (channel). Read from the plan's weights once."""

    def __init__(self, plan):
        self.kind = plan.pattern.kind
        if self.kind == "unstructured":
            # kept weights are the top-c magnitudes and zeros sort last: min(c, nonzeros) stay nonzero
            self.full = np.array([u.numel for u in plan.units], dtype=np.int64)
            self.nonzeros = np.array([_nonzeros(plan, i, u.numel) for i, u in enumerate(plan.units)], dtype=np.int64)
            return
        weights = {layer.name: layer.tensor for layer in plan.layers}
        if self.kind == "block":
            self.full = np.array([weights[u.name].numel() for u in plan.units], dtype=np.int64)
            per_unit = [_tile_nonzeros(weights[u.name], plan.block_size) for u in plan.units]
        else:
            self.full = np.array([u.numel for u in plan.units], dtype=np.int64)
            per_unit = [_alive(u.group, weights) for u in plan.units]
            self.aligned = np.array([u.group.kind == "hidden" for u in plan.units])  # shrink() aligns neuron widths
        # a layer keeps its units in the order (value descending, index): the order of layer_mask
        self.prefix = [np.concatenate([[0], np.cumsum(counts[np.argsort(-u.values.cpu().numpy(), kind="stable")])])
                       for u, counts in zip(plan.units, per_unit)]

    def at(self, counts: np.ndarray) -> np.ndarray:
        if self.kind == "unstructured":
            return np.minimum(counts, self.nonzeros)
        kept = np.array([p[c] for p, c in zip(self.prefix, counts)], dtype=np.int64)
        if self.kind == "channel":
            # shrink() keeps the live units, at least one, then rounds MLP widths up within the layer
            kept = np.maximum(kept, 1)
            up = kept + (-kept % MLP_ALIGN)
            kept = np.where(self.aligned & (up <= self.full), up, kept)
        return kept


def _nonzeros(plan, i: int, n: int) -> int:
    lo, hi = 0, n  # magnitudes are sorted descending: find the first zero
    while lo < hi:
        mid = (lo + hi) // 2
        if plan.magnitude_at(i, mid) > 0:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _array(w: torch.Tensor) -> np.ndarray:
    # numpy, not torch: its reductions over these weights measured 4-15x faster here
    w = w.detach().cpu()
    return (w if w.dtype in (torch.float16, torch.float32, torch.float64) else w.float()).numpy()


def _tile_nonzeros(w: torch.Tensor, b: int) -> np.ndarray:
    """Nonzero weights per BxB tile, tiles in the order of patterns' block units."""
    a = _array(w)
    rows, cols = a.shape
    tr, tc = -(-rows // b), -(-cols // b)
    if a.all():  # the usual case: every tile is full (edge tiles are smaller)
        return np.outer(np.minimum(b, rows - b * np.arange(tr)), np.minimum(b, cols - b * np.arange(tc))).reshape(-1)
    nz = np.zeros((tr * b, tc * b), dtype=np.int64)
    nz[:rows, :cols] = a != 0
    return nz.reshape(tr, b, tc, b).sum(axis=(1, 3)).reshape(-1)


def _alive(group, weights) -> np.ndarray:
    """1 for a unit whose output weights are not all zero: the ones shrink() keeps (``Group.alive``,
    in numpy, which measured several times faster than torch on Swin-B's MLP weights)."""
    alive = np.zeros(group.units, dtype=bool)
    for m in group.members:
        if m.output:
            a = _array(weights[m.name])
            nonzero = np.moveaxis(a, m.axis, 0).reshape(a.shape[m.axis], -1).any(axis=1)
            alive |= nonzero[m.index.numpy()].any(axis=1)
    return alive.astype(np.int64)


class FlopsBudget:
    """The FLOPs a plan's keep counts leave, for one model and input size."""

    def __init__(self, plan, kept: Kept, model: torch.nn.Module, shape):
        work = workload(model, shape)
        self.dense = tally(model, work)[0]
        self.pattern = plan.pattern
        self._kept = kept
        if plan.pattern.kind == "channel":
            find_adapter(model).check_shrink(model)  # what shrink() cannot build has no FLOPs to count
            self._cost = _unit_costs(plan, work)
        else:  # a weight costs the positions its layer sees
            self._cost = np.array([work.positions.get(_module_name(u.name), 0) for u in plan.units], dtype=np.int64)
        if plan.method == "uniform":
            self._sizes = [u.numel for u in plan.units]
        elif plan.method == "global":
            self._sizes = [sum(u.numel for u in plan.units)]
        else:
            self._sizes = [sum(u.numel for u in plan.units if u.module == m) for m in plan.modules]
        self._seen: dict[tuple, float] = {}

    def reduction(self, counts: np.ndarray) -> float:
        """The FLOPs reduction at these keep counts, by the formulas ``report`` evaluates."""
        return share_removed(self.dense, pruned_macs(self.dense, self._cost, self._kept.full - self._kept.at(counts)))

    def reduction_at(self, ratio: float, keep_counts) -> float:
        key = tuple(prune_count(ratio, s) for s in self._sizes)  # all that the keep counts depend on
        value = self._seen.get(key)
        if value is None:
            if len(self._seen) > 4096:
                self._seen.clear()
            value = self._seen[key] = self.reduction(keep_counts(ratio))
        return value

    def smallest_ratio(self, target: float, keep_counts) -> float:
        """The smallest ratio whose reduction is >= target; ``keep_counts(ratio)`` is the plan's."""
        if self.reduction_at(0.0, keep_counts) >= target:
            return 0.0
        best = self.reduction_at(LAST_RATIO, keep_counts)
        if best < target:
            shown = math.floor(best * 1e4) / 1e4
            shown = shown - 1e-4 if shown > best else shown
            why = ("every block keeps one head and one MLP neuron, rounded up to 8, and layers outside the blocks are never pruned"
                   if self.pattern.kind == "channel" else
                   "layers outside the prunable modules and the attention matmuls are never pruned")
            raise DimapError(f"a FLOPs reduction of {target:g} is out of reach: pattern {str(self.pattern)!r} removes at most "
                             f"{shown:.4f} of the FLOPs ({why}); ask for {shown:.4f} or less")
        lo, hi = 0.0, LAST_RATIO
        while True:
            mid = lo + (hi - lo) / 2
            if not lo < mid < hi:
                return hi
            if self.reduction_at(mid, keep_counts) >= target:
                hi = mid
            else:
                lo = mid


def _module_name(param: str) -> str:
    return param[: -len(".weight")] if param.endswith(".weight") else param


def _unit_costs(plan, work) -> np.ndarray:
    """FLOPs one unit costs, per unit layer: its share of every weight matrix in its group that runs
    (rows or columns of the Linears, and per-head rows of a position-bias MLP), and for heads an
    equal share of what the attention module does outside its weight layers (q @ k^T, attn @ v)."""
    costs = []
    for u in plan.units:
        group = u.group
        cost = 0
        for m in group.members:
            layer = _module_name(m.name)
            if not m.name.endswith(".weight") or layer not in work.positions or len(m.shape) < 2:
                continue
            per_unit = m.index.shape[1] * math.prod(m.shape) // m.shape[m.axis]
            cost += work.positions[layer] * per_unit
        if group.kind == "heads":
            cost += _matmuls(work, _common_module(group.weight_names())) // group.units
        costs.append(cost)
    return np.array(costs, dtype=np.int64)


def _common_module(weights: list[str]) -> str:
    """The innermost module holding all of a group's weights: a block's attention."""
    parts = [_module_name(w).split(".") for w in weights]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _matmuls(work, module: str) -> int:
    """The multiply-adds of ``module`` that none of its weight layers does: its attention matmuls,
    as wide as its heads (the per-head cost of its position-bias MLP is counted with the group)."""
    inner = sum(macs for name, macs in work.layers.items() if name.startswith(module + "."))
    return work.modules.get(module, 0) - inner
