"""An independent, literal implementation of Eq. 10 and the three baselines, for tests only.

Written from the equation (per-weight argsort, scatter back, one sort over the whole module), the
way the LAMP code does it: slow, obvious, and sharing no code with the engine.
"""

from __future__ import annotations

import fnmatch
import math

import numpy as np
import torch

PATTERNS = {
    "QKV-M": ["*blocks.*.attn.qkv.weight"],
    "PRJ-M": ["*blocks.*.attn.proj.weight"],
    "MLP-M": ["*blocks.*.mlp.fc1.weight", "*blocks.*.mlp.fc2.weight"],
}


def prunable(state_dict, patterns=PATTERNS):
    out = []
    for name, t in state_dict.items():
        for module, pats in patterns.items():
            if any(fnmatch.fnmatchcase(name, p) for p in pats):
                out.append((name, module, t))
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


def _keep_top(keys_per_layer, ranks_per_layer, keep):
    """Keep `keep` weights in the order (key desc, layer asc, rank asc); masks per layer."""
    keys = torch.cat(keys_per_layer).numpy()
    layer_ids = np.concatenate([np.full(k.numel(), i) for i, k in enumerate(keys_per_layer)])
    ranks = torch.cat(ranks_per_layer).numpy()
    order = np.lexsort((ranks, layer_ids, -keys))  # last key is primary
    kept = np.zeros(keys.size, dtype=bool)
    kept[order[:keep]] = True
    out, start = [], 0
    for k in keys_per_layer:
        out.append(torch.from_numpy(kept[start : start + k.numel()].copy()))
        start += k.numel()
    return out


def n_pruned(ratio, size):
    return min(size, int(math.floor(ratio * size + 0.5)))


def reference_masks(state_dict, ratio, method="dimap", patterns=PATTERNS):
    layers = prunable(state_dict, patterns)
    masks = {}
    if method == "uniform":
        for name, _, w in layers:
            keep = w.numel() - n_pruned(ratio, w.numel())
            ranks = layer_ranks(w)
            masks[name] = (ranks < keep).reshape(w.shape)
        return masks
    groups = {}
    for name, module, w in layers:
        groups.setdefault(module if method == "dimap" else "all", []).append((name, w))
    for members in groups.values():
        if method == "dimap":
            keys = [lamp_scores(w) for _, w in members]
        else:
            keys = [w.detach().reshape(-1).double().abs() for _, w in members]
        ranks = [layer_ranks(w) for _, w in members]
        size = sum(w.numel() for _, w in members)
        kept = _keep_top(keys, ranks, size - n_pruned(ratio, size))
        for (name, w), m in zip(members, kept):
            masks[name] = m.reshape(w.shape)
    return masks
