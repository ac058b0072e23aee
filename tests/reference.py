"""An independent, literal implementation of Eq. 10 and the three baselines, for tests only.

Written from the equation (per-weight argsort, scatter back, one sort over the whole module), the
way the LAMP code does it: slow, obvious, and sharing no code with the engine.
"""

from __future__ import annotations

import fnmatch
import math
import re

import numpy as np
import torch

PATTERNS = {
    "QKV-M": ["*blocks.*.attn.qkv.weight"],
    "PRJ-M": ["*blocks.*.attn.proj.weight"],
    "MLP-M": ["*blocks.*.mlp.fc1.weight", "*blocks.*.mlp.fc2.weight"],
}


def _natural(name):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def prunable(state_dict, patterns=PATTERNS):
    """Prunable weights in natural name order (layers.2 before layers.10), the documented layer order."""
    out = []
    for name in sorted(state_dict, key=_natural):
        for module, pats in patterns.items():
            if any(fnmatch.fnmatchcase(name, p) for p in pats):
                out.append((name, module, state_dict[name]))
    return out


def layer_ranks(w: torch.Tensor) -> torch.Tensor:
    """Rank of every weight (0 = largest magnitude), ties by flat index."""
    mags = w.detach().reshape(-1).float().abs()
    order = torch.sort(mags, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return ranks


def lamp_scores(w: torch.Tensor) -> torch.Tensor:
    """Eq. 10 per weight, in flat order, float64."""
    mags = w.detach().reshape(-1).double().abs()
    order = torch.sort(w.detach().reshape(-1).float().abs(), descending=True, stable=True).indices
    sq = mags[order] ** 2
    denom = torch.cumsum(sq, 0)
    s = torch.where(denom > 0, sq / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(sq))
    scores = torch.empty_like(s)
    scores[order] = s
    return scores


def _order(keys_per_layer, ranks_per_layer):
    """The keep order over a group: key descending, then layer, then rank."""
    keys = torch.cat(keys_per_layer).numpy()
    layer_ids = np.concatenate([np.full(k.numel(), i, dtype=np.int32) for i, k in enumerate(keys_per_layer)])
    ranks = torch.cat(ranks_per_layer).numpy()
    return np.lexsort((ranks, layer_ids, -keys))  # the last key is the primary one


def n_pruned(ratio, size):
    return min(size, int(math.floor(ratio * size + 0.5)))


class Reference:
    """Masks of one model at any ratio, from one literal ranking per group."""

    def __init__(self, state_dict, method="dimap", patterns=PATTERNS):
        self.method = method
        self.layers = prunable(state_dict, patterns)
        self.groups = []
        if method == "uniform":
            self.ranks = {name: layer_ranks(w) for name, _, w in self.layers}
            return
        grouped = {}
        for name, module, w in self.layers:
            grouped.setdefault(module if method == "dimap" else "all", []).append((name, w))
        for members in grouped.values():
            if method == "dimap":
                keys = [lamp_scores(w) for _, w in members]
            else:
                keys = [w.detach().reshape(-1).double().abs() for _, w in members]
            ranks = [layer_ranks(w) for _, w in members]
            self.groups.append((members, _order(keys, ranks)))

    def masks(self, ratio):
        out = {}
        if self.method == "uniform":
            for name, _, w in self.layers:
                keep = w.numel() - n_pruned(ratio, w.numel())
                out[name] = (self.ranks[name] < keep).reshape(w.shape)
            return out
        for members, order in self.groups:
            size = order.size
            kept = np.zeros(size, dtype=bool)
            kept[order[: size - n_pruned(ratio, size)]] = True
            start = 0
            for name, w in members:
                out[name] = torch.from_numpy(kept[start : start + w.numel()].copy()).reshape(w.shape)
                start += w.numel()
        return out


def reference_masks(state_dict, ratio, method="dimap", patterns=PATTERNS):
    return Reference(state_dict, method, patterns).masks(ratio)


def literal_unit_keep(energies_per_layer, ratio, method="dimap", floor_one=False):
    """Unit keep masks per layer from Eq. 10 on unit energies (tiles, neurons, heads), selected
    literally; ``floor_one``: a layer left empty keeps its largest unit, as the channel pattern does."""
    keys = []
    for li, e in enumerate(energies_per_layer):
        order = sorted(range(len(e)), key=lambda j: (-e[j], j))
        s = 0.0
        for r, j in enumerate(order):
            s += e[j]
            k = e[j] / s if s > 0 else 0.0
            if method == "global":
                k = e[j]
            keys.append((k, li, r, j))
    n = len(keys)
    prune = int(math.floor(ratio * n + 0.5))
    keys.sort(key=lambda t: (-t[0], t[1], t[2]))
    kept = [np.zeros(len(e), dtype=bool) for e in energies_per_layer]
    for k, li, r, j in keys[: n - prune]:
        kept[li][j] = True
    if floor_one:
        for li, e in enumerate(energies_per_layer):
            if not kept[li].any():
                kept[li][min(range(len(e)), key=lambda j: (-e[j], j))] = True
    return kept
