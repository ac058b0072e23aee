"""Turn a channel-pruned Swin into a physically smaller one, and save and load it.

A hidden neuron whose fc2 column is all zero adds nothing to the block's output, whatever its fc1
row and bias hold; a head whose proj columns are all zero adds nothing either. ``shrink`` removes
exactly those, so the smaller model gives the masked model's logits (up to float summation order).
It works on timm's ``SwinTransformer`` (v1): its attention keeps one relative-position-bias column
per head, which is cut with the head.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from .errors import DimapError
from .io import load_state_dict, save_atomic


def _blocks(model: nn.Module):
    for name, mod in model.named_modules():
        if hasattr(mod, "attn") and hasattr(mod, "mlp") and hasattr(mod.attn, "qkv") and hasattr(mod.mlp, "fc1"):
            yield name, mod


def _check_swin(model: nn.Module) -> list:
    blocks = list(_blocks(model))
    if not blocks:
        raise DimapError("shrink needs a timm Swin: no block with attn.qkv and mlp.fc1 found")
    for name, block in blocks:
        if not hasattr(block.attn, "relative_position_bias_table"):
            raise DimapError(f"{name}: shrink supports timm's SwinTransformer (v1) attention only")
    return blocks


def _linear(in_f: int, out_f: int, bias: bool, like: nn.Linear) -> nn.Linear:
    return nn.Linear(in_f, out_f, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


@torch.no_grad()
def _resize_block(block: nn.Module, heads: torch.Tensor, neurons: torch.Tensor, copy: bool = True) -> None:
    """Keep the given head and neuron indices; with copy=False only the shapes change."""
    attn, mlp = block.attn, block.mlp
    dim = attn.proj.out_features
    hd = attn.qkv.out_features // (3 * attn.num_heads)
    rows = (torch.arange(3)[:, None, None] * attn.num_heads * hd + heads[None, :, None] * hd + torch.arange(hd)[None, None, :]).reshape(-1)
    cols = (heads[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
    qkv = _linear(attn.qkv.in_features, rows.numel(), attn.qkv.bias is not None, attn.qkv)
    proj = _linear(cols.numel(), dim, attn.proj.bias is not None, attn.proj)
    table = nn.Parameter(attn.relative_position_bias_table.data[:, heads].clone())
    fc1 = _linear(mlp.fc1.in_features, neurons.numel(), mlp.fc1.bias is not None, mlp.fc1)
    fc2 = _linear(neurons.numel(), mlp.fc2.out_features, mlp.fc2.bias is not None, mlp.fc2)
    if copy:
        _copy_kept(qkv, attn.qkv, rows, dim=0)
        _copy_kept(proj, attn.proj, cols, dim=1)
        _copy_kept(fc1, mlp.fc1, neurons, dim=0)
        _copy_kept(fc2, mlp.fc2, neurons, dim=1)
    attn.qkv, attn.proj, attn.relative_position_bias_table = qkv, proj, table
    attn.num_heads = int(heads.numel())
    mlp.fc1, mlp.fc2 = fc1, fc2
    if hasattr(attn, "fused_attn"):
        # timm's SDPA path (off by default for Swin): the scale, bias/mask add and softmax in one
        # op. Channel pruning leaves the first stage whole, and its attention bookkeeping then
        # dominates the shrunk model's CPU time (profiled: 64% of stage 0 is not GEMM).
        attn.fused_attn = True


def _copy_kept(dst: nn.Linear, src: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Kept outputs (dim 0: rows and their biases) or kept inputs (dim 1: columns; the bias stays whole)."""
    dst.weight.copy_(src.weight.index_select(dim, index))
    if dst.bias is not None:
        dst.bias.copy_(src.bias[index] if dim == 0 else src.bias)


def block_sizes(model: nn.Module) -> dict[str, dict[str, int]]:
    return {name: {"heads": int(b.attn.num_heads), "hidden": int(b.mlp.fc1.out_features)} for name, b in _blocks(model)}


def _align(kept: torch.Tensor, total: int, align: int) -> torch.Tensor:
    """Round the kept count up to a multiple of ``align`` with removed (zero-output) units.

    Those units add exactly nothing, and matrix widths that are not a multiple of 8 measured up to
    1.5x slower per column on the CPU (oneDNN), which would eat the gain of removing them.
    """
    short = -kept.numel() % align
    if align <= 1 or short == 0 or kept.numel() + short > total:
        return kept
    spare = torch.ones(total, dtype=torch.bool)
    spare[kept] = False
    extra = torch.nonzero(spare).reshape(-1)[:short]
    return torch.sort(torch.cat([kept, extra])).values


@torch.no_grad()
def shrink(model: nn.Module, align: int = 8) -> nn.Module:
    """Remove, in place, every neuron and head that a channel pruning zeroed; returns the model.

    A head or neuron counts as removed when its output weights (proj columns, fc2 column) are all
    zero; at least one head stays in every block (a head with zero output is kept if it is the last).
    MLP widths are rounded up to a multiple of ``align`` (see ``_align``); ``align=1`` keeps only
    live neurons. Shrunk attentions run timm's SDPA path (``fused_attn``): the same outputs.
    """
    for name, block in _check_swin(model):
        attn, mlp = block.attn, block.mlp
        hd = attn.qkv.out_features // (3 * attn.num_heads)
        alive = attn.proj.weight.reshape(attn.proj.out_features, attn.num_heads, hd).ne(0).any(dim=2).any(dim=0)
        heads = torch.nonzero(alive).reshape(-1).cpu()
        if heads.numel() == 0:
            heads = torch.zeros(1, dtype=torch.long)
        neurons = torch.nonzero(mlp.fc2.weight.ne(0).any(dim=0)).reshape(-1).cpu()
        if neurons.numel() == 0:
            neurons = torch.zeros(1, dtype=torch.long)  # keep shapes valid; its fc2 column is zero
        neurons = _align(neurons, mlp.fc2.in_features, align)
        _resize_block(block, heads, neurons)
    return model


def save_shrunk(model: nn.Module, path, arch: str | None = None, config: dict | None = None) -> None:
    """Weights plus the per-block sizes and the base architecture, so ``load_shrunk`` needs nothing else."""
    if arch is None and config is None:
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch and config is None:
        raise DimapError("save_shrunk needs the base architecture: pass arch='swin_tiny_patch4_window7_224' or config=")
    meta = {"format": "dimap-fast/shrunk-1", "block_sizes": json.dumps(block_sizes(model))}
    if arch:
        meta["timm_model"] = arch
    if config is not None:
        meta["model_config"] = json.dumps(config)
    save_atomic(path, model.state_dict(), meta)


def load_shrunk(path) -> nn.Module:
    """Rebuild a model written by ``save_shrunk`` from the file alone."""
    from .sources import create_timm_model, demo_model_from_metadata

    state, meta = load_state_dict(path)
    if meta.get("format") != "dimap-fast/shrunk-1":
        raise DimapError(f"{path} is not a shrunk model written by dimap-fast (no block sizes in it)")
    model = create_timm_model(meta["timm_model"]) if meta.get("timm_model") else demo_model_from_metadata(meta)
    if model is None:
        raise DimapError(f"{path} names no architecture to rebuild")
    sizes = json.loads(meta["block_sizes"])
    blocks = dict(_check_swin(model))
    for name, size in sizes.items():
        if name not in blocks:
            raise DimapError(f"{path}: block {name} is not in the rebuilt architecture")
        _resize_block(blocks[name], torch.arange(size["heads"]), torch.arange(size["hidden"]), copy=False)
    from .sources import load_into

    load_into(model, state, path)
    return model.eval()
