"""The usual way to compute DIMAP/LAMP masks, as the LAMP authors' code does: the baseline to beat.

Per layer: argsort the squared weights, a suffix sum as total minus prefix, scatter the scores
back to weight order; per module: concatenate and take one k-th value. Written for timing only.
"""

import torch


def lamp_reference_masks(layers, ratio):
    """layers: list of (name, module, tensor). Returns masks keyed by name."""
    scores = {}
    for name, _, w in layers:
        sq = w.detach().reshape(-1).double() ** 2
        sorted_sq, order = torch.sort(sq)  # ascending, as in LAMP
        suffix = sorted_sq.sum() - torch.cumsum(sorted_sq, 0) + sorted_sq
        s = torch.zeros_like(sq)
        s[order] = sorted_sq / suffix.clamp_min(1e-300)
        scores[name] = s
    masks = {}
    modules = {}
    for name, module, w in layers:
        modules.setdefault(module, []).append(name)
    for module, names in modules.items():
        flat = torch.cat([scores[n] for n in names])
        k = int(ratio * flat.numel() + 0.5)
        threshold = torch.kthvalue(flat, k).values if k > 0 else -1.0
        for n in names:
            masks[n] = scores[n] > threshold
    return masks
