"""Pruning patterns: what one pruning unit is, and how a kept unit maps back to weights.

- ``unstructured`` (the paper): a unit is a weight; its magnitude is |w|.
- ``block``: a unit is a BxB tile of a weight matrix (edge tiles may be smaller); its energy is
  the tile's squared Frobenius norm. Eq. 10 then runs over the tiles of a layer exactly as over
  weights (descending, prefix sum), with one threshold per module: each module loses
  round(ratio x its tiles).
- ``channel``: a unit is an MLP hidden neuron (row i of fc1 and its bias, column i of fc2) or an
  attention head (its rows of q, k and v in qkv with their biases, its columns of proj); its energy
  is the group's squared L2 norm. A "layer" is one block's MLP or one block's attention; modules
  are MLP-M (neurons) and ATTN-M (heads, covering QKV-M and PRJ-M). Every layer keeps at least one
  unit, so a module can lose slightly fewer units than asked when a whole layer would go.
- ``2:4``: in every group of 4 consecutive input weights the 2 with the highest score stay. Inside
  a layer the score follows the magnitude, so it is the 2 largest (ties by flat index). It always
  removes half: the ratio must be 0.5.

Masks are always ordinary per-weight masks keyed by parameter name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import DimapError
from .modules import Layer

PATTERNS = ("unstructured", "block", "channel", "2:4")
BLOCK_SIZES = (16, 32, 64)


@dataclass
class UnitLayer:
    """One layer as the scorer sees it: a 1-D tensor of unit values and the way back to weights."""

    name: str
    module: str
    values: torch.Tensor  # |w| (any shape, unstructured) or float64 energies (structured)
    squared: bool  # True when values are energies already (no squaring before Eq. 10)
    expand: Callable[[torch.Tensor], dict[str, torch.Tensor]]

    @property
    def numel(self) -> int:
        return self.values.numel()


def check_pattern(pattern: str, block_size: int) -> None:
    if pattern not in PATTERNS:
        raise DimapError(f"unknown pattern {pattern!r}: choose one of {', '.join(PATTERNS)}")
    if pattern == "block" and block_size not in BLOCK_SIZES:
        raise DimapError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")


def unit_layers(layers: list[Layer], pattern: str, block_size: int, tensors: dict | None = None) -> list[UnitLayer]:
    if pattern == "unstructured":
        return [UnitLayer(l.name, l.module, l.tensor, False, _identity(l.name, l.tensor.shape)) for l in layers]
    if pattern == "block":
        return [_block_units(l, block_size) for l in layers]
    if pattern == "channel":
        return _channel_units(layers, tensors or {})
    raise DimapError(f"pattern {pattern!r} has no unit layers")  # 2:4 is handled without a threshold


def _identity(name, shape):
    return lambda mask: {name: mask.reshape(shape)}


def _matrix(layer: Layer) -> torch.Tensor:
    if layer.tensor.dim() != 2:
        raise DimapError(f"{layer.name} has shape {tuple(layer.tensor.shape)}: structured patterns need 2-D weights")
    return layer.tensor


def _block_units(layer: Layer, b: int) -> UnitLayer:
    w = _matrix(layer)
    rows, cols = w.shape
    tr, tc = -(-rows // b), -(-cols // b)
    sq = w.detach().double().square()
    sq = F.pad(sq, (0, tc * b - cols, 0, tr * b - rows))
    energy = sq.reshape(tr, b, tc, b).sum(dim=(1, 3)).reshape(-1)

    def expand(tile_mask):
        grid = tile_mask.reshape(tr, tc)
        full = grid.repeat_interleave(b, 0).repeat_interleave(b, 1)
        return {layer.name: full[:rows, :cols].contiguous()}

    return UnitLayer(layer.name, layer.module, energy, True, expand)


_BLOCK_PREFIX = re.compile(r"^(.*)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight$")


def _channel_units(layers: list[Layer], tensors: dict) -> list[UnitLayer]:
    blocks: dict[str, dict[str, Layer]] = {}
    for layer in layers:
        m = _BLOCK_PREFIX.match(layer.name)
        if m is None:
            raise DimapError(f"pattern 'channel' needs Swin block weights (attn.qkv, attn.proj, mlp.fc1, mlp.fc2), not {layer.name}")
        blocks.setdefault(m.group(1), {})[m.group(2)] = layer
    units = []
    for prefix, parts in blocks.items():
        if "mlp.fc1" in parts and "mlp.fc2" in parts:
            units.append(_neuron_units(prefix, parts["mlp.fc1"], parts["mlp.fc2"], tensors))
        if "attn.qkv" in parts and "attn.proj" in parts:
            units.append(_head_units(prefix, parts["attn.qkv"], parts["attn.proj"], tensors))
    if not units:
        raise DimapError("pattern 'channel' found no complete block (fc1 with fc2, qkv with proj)")
    return units


def _neuron_units(prefix, fc1: Layer, fc2: Layer, tensors) -> UnitLayer:
    w1, w2 = _matrix(fc1), _matrix(fc2)
    if w1.shape[0] != w2.shape[1]:
        raise DimapError(f"{prefix}: fc1 has {w1.shape[0]} outputs but fc2 {w2.shape[1]} inputs")
    energy = w1.detach().double().square().sum(1) + w2.detach().double().square().sum(0)
    bias = tensors.get(f"{prefix}.mlp.fc1.bias")
    if bias is not None:
        energy = energy + bias.detach().double().square()

    def expand(keep):
        return {fc1.name: keep[:, None].expand(w1.shape).contiguous(), fc2.name: keep[None, :].expand(w2.shape).contiguous()}

    return UnitLayer(f"{prefix}.mlp", "MLP-M", energy, True, expand)


def head_count(prefix: str, tensors: dict) -> int:
    """Swin stores one relative-position bias column (v1) or logit scale (v2) per head."""
    table = tensors.get(f"{prefix}.attn.relative_position_bias_table")
    if table is not None:
        return int(table.shape[-1])
    scale = tensors.get(f"{prefix}.attn.logit_scale")
    if scale is not None:
        return int(scale.shape[0])
    raise DimapError(f"{prefix}: cannot tell its number of heads (no relative_position_bias_table or logit_scale)")


def head_rows(heads: int, dim: int) -> torch.Tensor:
    """[heads, 3 * head_dim] row indices of each head's q, k and v in a qkv weight of 3*dim rows."""
    hd = dim // heads
    base = torch.arange(heads)[:, None] * hd + torch.arange(hd)[None, :]
    return torch.cat([base, base + dim, base + 2 * dim], dim=1)


def _head_units(prefix, qkv: Layer, proj: Layer, tensors) -> UnitLayer:
    wq, wp = _matrix(qkv), _matrix(proj)
    dim = wp.shape[0]
    heads = head_count(prefix, tensors)
    if wq.shape[0] != 3 * dim or dim % heads:
        raise DimapError(f"{prefix}: qkv {tuple(wq.shape)} and proj {tuple(wp.shape)} do not split into {heads} heads")
    hd = dim // heads
    rows = head_rows(heads, dim)
    row_energy = wq.detach().double().square().sum(1)
    for name in ("qkv.bias", "q_bias", "k_bias", "v_bias"):
        b = tensors.get(f"{prefix}.attn.{name}")
        if b is None:
            continue
        b = b.detach().double().square()
        offset = {"q_bias": 0, "k_bias": dim, "v_bias": 2 * dim}.get(name, 0)
        row_energy[offset : offset + b.numel()] += b
    energy = row_energy[rows].sum(1) + wp.detach().double().square().sum(0).reshape(heads, hd).sum(1)

    def expand(keep):
        row_keep = torch.zeros(wq.shape[0], dtype=torch.bool, device=keep.device)
        row_keep[rows.to(keep.device).reshape(-1)] = keep[:, None].expand(heads, 3 * hd).reshape(-1)
        col_keep = keep.repeat_interleave(hd)
        return {qkv.name: row_keep[:, None].expand(wq.shape).contiguous(), proj.name: col_keep[None, :].expand(wp.shape).contiguous()}

    return UnitLayer(f"{prefix}.attn", "ATTN-M", energy, True, expand)


def two_four_mask(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Keep the 2 largest magnitudes of every 4 consecutive input weights, ties by flat index."""
    if tensor.shape[-1] % 4:
        raise DimapError(f"{name}: pattern '2:4' needs an input size divisible by 4, got {tensor.shape[-1]}")
    groups = tensor.detach().float().abs().reshape(-1, 4)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, order[:, :2], True)
    return mask.reshape(tensor.shape)
