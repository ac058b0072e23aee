"""Pruning patterns: what one pruning unit is, and how a kept unit maps back to weights.

- ``unstructured`` (the paper): a unit is a weight; its magnitude is |w|.
- ``block``: a unit is a BxB tile of a weight matrix (edge tiles may be smaller); its energy is
  the tile's squared Frobenius norm. Eq. 10 then runs over the tiles of a layer exactly as over
  weights (descending, prefix sum), with one threshold per module: each module loses
  round(ratio x its tiles).
- ``channel``: a unit is an MLP hidden neuron (a row of the first Linear and its bias, a column of
  the second) or an attention head (its rows of q, k and v with their biases, its columns of the
  output Linear), as the model's architecture adapter groups them (``dimap_fast.arch``); its
  energy is the group's squared L2 norm. A "layer" is one block's MLP or one block's attention;
  modules are MLP-M (neurons) and ATTN-M (heads, covering QKV-M and PRJ-M). Every layer keeps at
  least one unit, so a module can lose slightly fewer units than asked when a whole layer would go.
- ``2:4``: in every group of 4 consecutive input weights the 2 with the highest score stay. Inside
  a layer the score follows the magnitude, so it is the 2 largest (ties by flat index). It always
  removes half: the ratio must be 0.5.

Masks are always ordinary per-weight masks keyed by parameter name.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from ..arch import Group, find_adapter
from ..errors import DimapError
from .prunable import Layer


@dataclass
class UnitLayer:
    """One layer as the scorer sees it: a 1-D tensor of unit values and the way back to weights."""

    name: str
    module: str
    values: torch.Tensor  # |w| (any shape, unstructured) or float64 energies (structured)
    squared: bool  # True when values are energies already (no squaring before Eq. 10)
    expand: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    group: Group | None = None  # channel: the neuron or head group (members, alive units), see dimap_fast.arch

    @property
    def numel(self) -> int:
        return self.values.numel()


def unit_layers(layers: list[Layer], pattern: str, block_size: int, tensors: dict | None = None,
                adapter=None) -> list[UnitLayer]:
    """The scorer's view of ``layers``. Channel groups come from ``adapter`` (an arch adapter;
    default the one the tensor names show); ``tensors`` holds the biases and per-head tensors."""
    if pattern == "unstructured":
        return [UnitLayer(l.name, l.module, l.tensor, False, _identity(l.name, l.tensor.shape)) for l in layers]
    if pattern == "block":
        return [_block_units(l, block_size) for l in layers]
    if pattern == "channel":
        return _channel_units(layers, tensors or {}, adapter)
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


def _channel_units(layers: list[Layer], tensors: dict, adapter) -> list[UnitLayer]:
    """One unit layer per neuron or head group of the adapter whose weights are all prunable."""
    tensors = {**tensors, **{layer.name: layer.tensor for layer in layers}}  # the weights as planned (device=)
    if adapter is None:  # a family the names show; else a generic adapter, which says what it lacks
        by_module: dict[str, list[str]] = {}
        for layer in layers:
            by_module.setdefault(layer.module, []).append(layer.name)
        adapter = find_adapter(tensors, module_map=by_module)
    names = {layer.name for layer in layers}
    units, covered = [], set()
    for group in adapter.groups(tensors):
        weights = group.weight_names()
        if not all(name in names for name in weights):
            continue
        covered.update(weights)
        units.append(UnitLayer(group.name, group.module, group.energy(tensors), True,
                               partial(group.expand, names=names), group))
    for layer in layers:  # natural order: the first stray weight is named
        if layer.name not in covered:
            raise DimapError(f"pattern 'channel' prunes whole neuron and head groups, and {layer.name} is not in one "
                             "whose weights are all prunable: let the module_map hold all of a group's weights, "
                             "or use pattern 'unstructured' or 'block'")
    if not units:
        raise DimapError("pattern 'channel' found no whole neuron or head group among the prunable weights: "
                         "let the module_map hold both MLP Linears, or all attention Linears, of a block")
    return units


def two_four_mask(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Keep the 2 largest magnitudes of every 4 consecutive input weights, ties by flat index."""
    if tensor.shape[-1] % 4:
        raise DimapError(f"{name}: pattern '2:4' needs an input size divisible by 4, got {tensor.shape[-1]}")
    groups = tensor.detach().float().abs().reshape(-1, 4)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, order[:, :2], True)
    return mask.reshape(tensor.shape)
