"""The models and state dicts gpu_check's steps build: tiny ones for a dry run, timm's Swins for
a real one, block-pruned, and the SDPA switch every dense baseline gets."""

from __future__ import annotations

PRUNABLE = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def tiny_state(seed: int = 0, dims=(8, 16)) -> dict:
    """A small state dict with Swin parameter names, with ties and zeros as checkpoints have."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, c in enumerate(dims):
        for b in range(2):
            p = f"layers.{i}.blocks.{b}."
            for name, shape in (("attn.qkv", (3 * c, c)), ("attn.proj", (c, c)), ("mlp.fc1", (4 * c, c)),
                                ("mlp.fc2", (c, 4 * c))):
                sd[f"{p}{name}.weight"] = torch.randn(shape, generator=g)
    sd["layers.0.blocks.0.mlp.fc2.weight"] = torch.round(sd["layers.0.blocks.0.mlp.fc2.weight"] * 2) / 2
    sd["layers.1.blocks.0.mlp.fc1.weight"][:4] = 0
    return sd


def small_swin(img_size: int = 16, seed: int = 0):
    """The small Swin of tests/test_nn.py (two stages, window 4), eval mode."""
    import torch
    from timm.models import swin_transformer as timm_swin

    torch.manual_seed(seed)
    model = timm_swin.SwinTransformer(img_size=img_size, patch_size=2, window_size=4, embed_dim=32,
                                      depths=(2, 2), num_heads=(2, 4), num_classes=10)
    return model.eval()


def block_prune_(model, ratio: float = 0.5, block: int = 32):
    """Zero the smallest BxB tiles of every prunable Linear, and make the bias tables matter."""
    import torch
    from torch import nn

    import dimap_fast.nn as dnn

    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name.endswith(PRUNABLE):
                dnn.zero_smallest_tiles_(mod.weight, ratio, block)
            if hasattr(mod, "relative_position_bias_table"):
                mod.relative_position_bias_table.normal_()
    return model


def sdpa_path(model):
    """``model`` on timm's SDPA attention path (``fused_attn``): the fair dense baseline."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    return model


def timm_swin_model(name: str, seed: int = 0):
    import timm
    import torch

    torch.manual_seed(seed)
    return timm.create_model(name).eval()
