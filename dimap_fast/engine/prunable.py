"""Which weights are prunable, and which DIMAP module each belongs to.

A module map is a dict from module name to a list of glob patterns over parameter names
(fnmatch rules: ``*`` also matches dots). By default the map is the one of the model's family,
read from its architecture adapter (``dimap_fast.arch``: timm Swin v1/v2, Hugging Face Swin and
Swinv2): the paper's Appendix B. A user module map overrides it. Everything the map does not name
(patch embedding, patch merging, norms, biases, position-bias tables, the head) stays dense.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from ..arch import find_adapter, natural_key
from ..errors import DimapError

__all__ = ["Layer", "check_module_map", "named_tensors", "non_finite_error", "prunable_layers", "prune_count"]


@dataclass(frozen=True)
class Layer:
    """One prunable weight: its parameter name, its module and the tensor itself (not a copy)."""

    name: str
    module: str
    tensor: torch.Tensor

    @property
    def numel(self) -> int:
        return self.tensor.numel()


def weight_version(t: torch.Tensor) -> int:
    """The tensor's in-place write counter; -1 for an inference tensor, which keeps none (it can
    be written in place only inside inference mode, which nothing here can see)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def named_tensors(source) -> dict[str, torch.Tensor]:
    """Parameters of a model, or the tensors of a state dict, detached but sharing storage."""
    if isinstance(source, torch.nn.Module):
        return {name: p.detach() for name, p in source.named_parameters()}
    if isinstance(source, Mapping):
        out = {}
        for name, value in source.items():
            if isinstance(value, torch.Tensor):
                out[str(name)] = value.detach()
        return out
    raise DimapError(
        f"expected a torch.nn.Module or a state dict, got {type(source).__name__}: "
        "pass a timm model or the dict that model.state_dict() returns"
    )


def check_module_map(module_map, source=None, arch=None) -> dict[str, tuple[str, ...]]:
    """A validated copy of ``module_map``; None gives the map of ``source``'s family (timm Swin's without one)."""
    if module_map is None:
        return dict(find_adapter(source, arch).module_map)
    if not isinstance(module_map, Mapping) or not module_map:
        raise DimapError(
            "module_map must be a non-empty dict of module name -> glob patterns, "
            "e.g. {'FFN': ['*.ffn.in.weight', '*.ffn.out.weight']}"
        )
    out = {}
    for module, patterns in module_map.items():
        if isinstance(patterns, str):
            patterns = (patterns,)
        patterns = tuple(patterns)
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise DimapError(f"module_map[{module!r}] must be one or more non-empty glob patterns")
        out[str(module)] = patterns
    return out


def prunable_layers(source, module_map=None, arch=None) -> list[Layer]:
    """The prunable weights of ``source`` in natural name order, each tagged with its module.

    Natural order (numbers compared as numbers) rather than the source's own order, because a
    safetensors file lists names alphabetically: a model and its checkpoint must get the same
    layer order, which the tie rule at a threshold depends on.

    Refuses (DimapError) a source with no prunable weight, a name claimed by two modules,
    non-floating, sparse, meta or empty weights, and weights spread over several devices or dtypes.
    NaN and Inf are refused by the scorers, which see them for free at the ends of each sorted layer.
    """
    tensors = named_tensors(source)
    module_map = check_module_map(module_map, source if isinstance(source, torch.nn.Module) else tensors, arch)
    layers = []
    for name, tensor in tensors.items():
        hits = [m for m, pats in module_map.items() if any(fnmatch.fnmatchcase(name, p) for p in pats)]
        if len(hits) > 1:
            raise DimapError(f"{name} matches modules {hits}: make the module_map patterns disjoint")
        if hits:
            layers.append(Layer(name, hits[0], tensor))
    if not layers:
        wanted = sorted({p for pats in module_map.values() for p in pats})
        raise DimapError(
            f"no prunable weight found (looked for {', '.join(wanted)}): "
            "this is not a timm Swin; pass module_map={'MODULE': ['glob', ...]} for other models"
        )
    layers.sort(key=lambda layer: natural_key(layer.name))
    _check_layers(layers)
    return layers


def _check_layers(layers: Iterable[Layer]) -> None:
    devices, dtypes = set(), {}
    for layer in layers:
        t = layer.tensor
        if not t.is_floating_point():
            raise DimapError(f"{layer.name} has dtype {t.dtype}: prunable weights must be floating point")
        if t.layout != torch.strided:
            raise DimapError(f"{layer.name} is a {t.layout} tensor: make the weights dense first (tensor.to_dense())")
        if t.is_meta:
            raise DimapError(f"{layer.name} is on the meta device and holds no values: load the weights first")
        if t.numel() == 0:
            raise DimapError(f"{layer.name} is empty (shape {tuple(t.shape)}): nothing to prune there")
        devices.add(t.device)
        dtypes.setdefault(t.dtype, layer.name)
    if len(devices) > 1:
        raise DimapError(
            f"prunable weights sit on several devices ({', '.join(sorted(map(str, devices)))}): "
            "move the model to one device first (model.to(device))"
        )
    if len(dtypes) > 1:
        # a module's weights compete under one threshold: ranking values rounded to different precisions,
        # or guessing a cast, would be silent; a half-cast model is almost always a mistake
        found = ", ".join(f"{str(d).replace('torch.', '')} ({name})" for d, name in dtypes.items())
        raise DimapError(
            f"prunable weights mix dtypes: {found}; cast them to one first, "
            "e.g. model.float() or {k: v.float() for k, v in state_dict.items()}"
        )


def prune_count(ratio: float, size: int) -> int:
    """round(ratio x size), halves rounded up, so the count never depends on banker's rounding."""
    return min(size, int(math.floor(ratio * size + 0.5)))


def non_finite_error(name: str, largest: float) -> DimapError:
    bad = "NaN" if math.isnan(largest) else "Inf"
    return DimapError(f"{name} holds {bad} weights: repair or retrain the checkpoint before pruning")
