"""Small state dicts with Swin parameter names, for tests."""

import torch


def make_state(shapes: dict, seed=0, dtype=torch.float32, scale=None):
    """A state dict of Swin-named prunable weights with the given shapes."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g) * (scale or 1.0)
        out[name] = t.to(dtype)
    return out
