"""GPU path of the Plan: torch sorts the keys, the Triton kernels of dimap_fast.kernels do the rest.

Per group (a module for dimap, every layer for global) the sorted magnitudes of all its layers lie
in one tensor, so one launch scores the whole module and one launch selects any number of ratios.
GPU memory is plentiful next to the CPU's, so every score is kept (float64) instead of block heads.
On CPU tensors this runs under TRITON_INTERPRET=1, which is how the tests exercise it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .prunable import non_finite_error, prune_count
from .units import UnitLayer


class TritonScorer:
    def __init__(self, layers: list[UnitLayer], method: str):
        from ..kernels import module_scores

        self.method = method
        self.numels = [layer.numel for layer in layers]
        self.groups = []  # (layer indices, sorted magnitudes, keys, offsets)
        self.where = {}  # layer index -> (group, offset)
        if method == "dimap":
            members = {}
            for i, layer in enumerate(layers):
                members.setdefault(layer.module, []).append(i)
            parts = list(members.values())
        elif method == "global":
            parts = [list(range(len(layers)))]
        else:
            parts = [[i] for i in range(len(layers))]
        for idx in parts:
            mags = torch.cat([_sorted_magnitudes(layers[i]) for i in idx])
            sizes = torch.tensor([0] + [self.numels[i] for i in idx], dtype=torch.int64)
            offsets = torch.cumsum(sizes, 0).to(mags.device)
            keys = module_scores(mags, offsets) if method == "dimap" else mags.double()
            g = len(self.groups)
            self.groups.append((idx, mags, keys, offsets))
            for j, i in enumerate(idx):
                self.where[i] = (g, int(sizes[: j + 1].sum()))

    def keep_counts(self, ratio: float) -> np.ndarray:
        return self.keep_counts_many([ratio])[0]

    def keep_counts_many(self, ratios) -> np.ndarray:
        """[R, L] keep counts: one selection launch per group for every ratio at once."""
        from ..kernels import select_keep_counts

        out = np.zeros((len(ratios), len(self.numels)), dtype=np.int64)
        if self.method == "uniform":
            for r, ratio in enumerate(ratios):
                out[r] = [n - prune_count(ratio, n) for n in self.numels]
            return out
        for idx, _, keys, offsets in self.groups:
            total = sum(self.numels[i] for i in idx)
            keep = torch.tensor([total - prune_count(r, total) for r in ratios], dtype=torch.int64, device=keys.device)
            out[:, idx] = select_keep_counts(keys, offsets, keep).cpu().numpy()
        return out

    def magnitude_at(self, i: int, rank: int) -> float:
        g, start = self.where[i]
        return float(self.groups[g][1][start + rank])

    def key_at(self, i: int, rank: int) -> float:
        g, start = self.where[i]
        return float(self.groups[g][2][start + rank])


def _sorted_magnitudes(layer: UnitLayer) -> torch.Tensor:
    mags = layer.values.detach().reshape(-1).abs()
    if mags.dtype != torch.float32:
        mags = mags.float()
    mags = torch.sort(mags, descending=True).values
    largest = float(mags[0])  # torch sorts NaN above +inf, so the first value tells
    if not math.isfinite(largest):
        raise non_finite_error(layer.name, largest)
    return mags
