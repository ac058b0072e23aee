"""Builders for test modules: ragged layers of descending magnitudes with ties and zeros."""

import torch

SIZES = [1, 2, 7, 33, 300, 5]


def offsets_of(sizes, device="cpu"):
    return torch.tensor([0] + list(sizes), dtype=torch.int64).cumsum(0).to(device)


def sorted_mags(sizes, dtype=torch.float32, levels=None, zero_tail=0, zero_layers=(), seed=0,
                device="cpu"):
    """Concatenated per-layer magnitudes sorted descending; ``levels`` > 0 forces many ties."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for i, n in enumerate(sizes):
        if levels:
            x = torch.randint(0, levels, (n,), generator=g).to(torch.float32) / levels
        else:
            x = torch.rand(n, generator=g) * 10 ** torch.empty(n).uniform_(-3, 1, generator=g)
        x = x.to(dtype).sort(descending=True).values
        if zero_tail:
            x[max(n - zero_tail, 0):] = 0
        if i in zero_layers:
            x.zero_()
        parts.append(x)
    return torch.cat(parts).to(device)
