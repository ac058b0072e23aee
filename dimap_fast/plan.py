"""Plan once, cut at any ratio.

``plan(model, method)`` does the work that does not depend on the ratio (one values-only sort per
layer and the prefix sums); ``Plan.masks(r)``, ``cutoffs(r)``, ``thresholds(r)`` and
``sparsity(r)`` then cost little for any number of ratios.

Methods (the prunable set is the same for all three):
- ``dimap``: Eq. 10 scores, one threshold per module; each module loses round(ratio x size).
- ``global``: one magnitude threshold over all prunable weights; they lose round(ratio x total).
- ``uniform``: each layer loses round(ratio x layer size) by magnitude.

Tie rule: weights are kept in the order (key descending, layer in model order, rank in the layer),
where the key is the score (dimap) or the magnitude (global, uniform) and the rank orders a layer
by magnitude descending, then by flat index. So at the threshold, earlier layers keep their ties
first, and inside a layer the lower flat index stays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import METHODS, DimapError, check_choice, check_ratio
from .modules import Layer, prunable_layers, prune_count
from .scores import Group, build_states


@dataclass(frozen=True)
class Cutoff:
    """A layer's cut: keep |w| > magnitude, then ties at it by flat index, ``keep`` weights in all."""

    magnitude: float
    keep: int
    numel: int


class Plan:
    """The ratio-independent part of a pruning run over one model's prunable weights."""

    def __init__(self, layers: list[Layer], method: str, backend: str, progress: bool = False):
        self.layers = layers
        self.method = method
        self.backend = backend
        self.modules = list(dict.fromkeys(layer.module for layer in layers))
        self._counts_cache: dict[float, np.ndarray] = {}
        bar = _progress_bar(sum(layer.numel for layer in layers), progress)
        try:
            if backend == "triton":
                from .triton_scores import TritonScorer

                self._scorer = TritonScorer(layers, method)
                if bar is not None:
                    bar.update(bar.total)
            else:
                self._scorer = NumpyScorer(layers, method, bar)
        finally:
            if bar is not None:
                bar.close()

    def __repr__(self) -> str:
        n = sum(layer.numel for layer in self.layers)
        return f"Plan(method={self.method!r}, backend={self.backend!r}, layers={len(self.layers)}, weights={n})"

    def keep_counts(self, ratio: float) -> np.ndarray:
        """Per layer (in model order), how many weights stay."""
        ratio = check_ratio(ratio)
        counts = self._counts_cache.get(ratio)
        if counts is None:
            counts = self._scorer.keep_counts(ratio)
            if len(self._counts_cache) > 64:
                self._counts_cache.clear()
            self._counts_cache[ratio] = counts
        return counts

    def keep_counts_many(self, ratios) -> np.ndarray:
        """[R, L] keep counts; the GPU path selects every ratio in one launch per group."""
        ratios = [check_ratio(r) for r in ratios]
        if hasattr(self._scorer, "keep_counts_many"):
            return self._scorer.keep_counts_many(ratios)
        return np.stack([self.keep_counts(r) for r in ratios]) if ratios else np.zeros((0, len(self.layers)), np.int64)

    def cutoffs(self, ratio: float) -> dict[str, Cutoff]:
        """Per layer: the smallest kept magnitude (inf when nothing stays) and the keep count."""
        counts = self.keep_counts(ratio)
        return {
            layer.name: Cutoff(self._scorer.magnitude_at(i, int(c) - 1) if c > 0 else math.inf, int(c), layer.numel)
            for i, (layer, c) in enumerate(zip(self.layers, counts))
        }

    def thresholds(self, ratio: float) -> dict[str, float]:
        """Per module, the smallest key that stays: the score (dimap) or the magnitude (global).

        ``uniform`` has no module threshold (every layer has its own): NaN. A module that keeps
        nothing reports inf.
        """
        counts = self.keep_counts(ratio)
        out = {}
        for module in self.modules:
            if self.method == "uniform":
                out[module] = math.nan
                continue
            keys = [
                self._scorer.key_at(i, int(c) - 1)
                for i, (layer, c) in enumerate(zip(self.layers, counts))
                if layer.module == module and c > 0
            ]
            out[module] = min(keys) if keys else math.inf
        return out

    def masks(self, ratio: float) -> dict[str, torch.Tensor]:
        """Boolean masks keyed by parameter name, True = kept, on the weights' device."""
        cuts = self.cutoffs(ratio)
        return {layer.name: layer_mask(layer.tensor, cuts[layer.name]) for layer in self.layers}

    @torch.no_grad()
    def prune_(self, ratio: float) -> dict[str, torch.Tensor]:
        """Zero the pruned weights of the planned tensors in place; returns the masks.

        The plan's tensors are the model's own parameters (or the state dict's tensors), so this
        prunes the model itself. On the GPU path one fused kernel per layer writes mask and zeros.
        """
        cuts = self.cutoffs(ratio)
        if self.backend == "triton":
            from .kernels import apply_cutoffs

            out = {}
            for layer in self.layers:
                cut = cuts[layer.name]
                flat = layer.tensor.view(-1)
                dev = flat.device
                mask, kept = apply_cutoffs(
                    flat,
                    torch.tensor([0, cut.numel], dtype=torch.int64, device=dev),
                    torch.tensor([cut.magnitude], dtype=torch.float32, device=dev),
                    torch.tensor([cut.keep], dtype=torch.int64, device=dev),
                )
                out[layer.name] = mask.view(layer.tensor.shape)
            return out
        masks = {layer.name: layer_mask(layer.tensor, cuts[layer.name]) for layer in self.layers}
        for layer in self.layers:
            layer.tensor.mul_(masks[layer.name])
        return masks

    def sparsity(self, ratio: float) -> dict[str, dict[str, float]]:
        """Fraction removed, per module and per layer: {"modules": {...}, "layers": {...}}."""
        counts = self.keep_counts(ratio)
        layers, kept, size = {}, {}, {}
        for layer, c in zip(self.layers, counts):
            layers[layer.name] = 1.0 - int(c) / layer.numel
            kept[layer.module] = kept.get(layer.module, 0) + int(c)
            size[layer.module] = size.get(layer.module, 0) + layer.numel
        modules = {m: 1.0 - kept[m] / size[m] for m in self.modules}
        return {"modules": modules, "layers": layers}


class NumpyScorer:
    """CPU path: numpy sorts and sums (both cores), then exact selection on block heads."""

    def __init__(self, layers: list[Layer], method: str, bar=None):
        self.method = method
        self.layers = layers
        self.states = build_states([layer.tensor for layer in layers], method, bar, [layer.name for layer in layers])
        self.groups: list[tuple[list[int], Group]] = []
        if method == "dimap":
            for module in dict.fromkeys(layer.module for layer in layers):
                idx = [i for i, layer in enumerate(layers) if layer.module == module]
                self.groups.append((idx, Group([self.states[i] for i in idx])))
        elif method == "global":
            self.groups.append((list(range(len(layers))), Group(self.states)))

    def keep_counts(self, ratio: float) -> np.ndarray:
        if self.method == "uniform":
            return np.array([s.numel - prune_count(ratio, s.numel) for s in self.states], dtype=np.int64)
        counts = np.zeros(len(self.states), dtype=np.int64)
        for idx, group in self.groups:
            counts[idx] = group.keep_counts(group.total - prune_count(ratio, group.total))
        return counts

    def magnitude_at(self, i: int, rank: int) -> float:
        return self.states[i].magnitude_at(rank)

    def key_at(self, i: int, rank: int) -> float:
        return self.states[i].key_at(rank)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.states)


def layer_mask(tensor: torch.Tensor, cut: Cutoff) -> torch.Tensor:
    """Keep |w| > cut, then the first ties at the cut by flat index, ``cut.keep`` in all."""
    if cut.keep >= cut.numel:
        return torch.ones(tensor.shape, dtype=torch.bool, device=tensor.device)
    if cut.keep <= 0:
        return torch.zeros(tensor.shape, dtype=torch.bool, device=tensor.device)
    if tensor.is_cuda:
        return _layer_mask_torch(tensor, cut)
    flat = tensor.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    mags = np.abs(flat.numpy())
    threshold = np.float32(cut.magnitude)
    mask = np.greater(mags, threshold)
    missing = cut.keep - int(np.count_nonzero(mask))
    if missing > 0:  # numpy here: torch's CPU reductions over bools measured several times slower
        ties = np.flatnonzero(mags == threshold)[:missing]
        mask[ties] = True
    return torch.from_numpy(mask).reshape(tensor.shape)


def _layer_mask_torch(tensor: torch.Tensor, cut: Cutoff) -> torch.Tensor:
    mags = tensor.detach().abs()
    if mags.dtype != torch.float32:
        mags = mags.float()
    threshold = torch.tensor(cut.magnitude, dtype=torch.float32, device=tensor.device)
    mask = mags > threshold
    missing = cut.keep - int(mask.sum())
    if missing > 0:
        ties = torch.nonzero((mags == threshold).reshape(-1)).squeeze(1)[:missing]
        mask.view(-1)[ties] = True
    return mask


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="w", unit_scale=True, desc="scoring", leave=False)


def plan(model_or_state_dict, method: str = "dimap", device=None, module_map=None, backend: str = "auto", progress: bool = False) -> Plan:
    """Score every prunable weight once; the returned Plan cuts at any ratio.

    device: where to score (default: where the weights are). backend: "auto" picks the Triton
    kernels for CUDA weights and numpy otherwise; "triton" forces the kernels (CPU tensors need
    TRITON_INTERPRET=1), "numpy" forces the CPU path.
    """
    check_choice("method", method, METHODS)
    check_choice("backend", backend, ("auto", "numpy", "triton"))
    layers = prunable_layers(model_or_state_dict, module_map)
    if device is not None:
        device = torch.device(device)
        layers = [Layer(l.name, l.module, l.tensor.to(device)) for l in layers]
    on_cuda = layers[0].tensor.is_cuda
    if backend == "auto":
        backend = "triton" if on_cuda else "numpy"
    if backend == "triton" and not on_cuda and not _interpreting():
        raise DimapError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before import; use backend='numpy'")
    return Plan(layers, method, backend, progress)


def compute_masks(model_or_state_dict, ratio: float, method: str = "dimap", module_map=None, **kwargs) -> dict[str, torch.Tensor]:
    """Boolean masks (True = kept), one per prunable weight, keyed by parameter name."""
    ratio = check_ratio(ratio)
    return plan(model_or_state_dict, method=method, module_map=module_map, **kwargs).masks(ratio)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
