"""Plan once, cut at any ratio.

``plan(model, method)`` does the work that does not depend on the ratio (one values-only sort per
layer and the prefix sums); ``Plan.masks(r)``, ``cutoffs(r)``, ``thresholds(r)`` and
``sparsity(r)`` then cost little for any number of ratios.

Methods (``Method`` values or their names; the prunable set is the same for all three):
- ``dimap``: Eq. 10 scores, one threshold per module; each module loses round(ratio x size).
- ``global``: one magnitude threshold over all prunable weights; they lose round(ratio x total).
- ``uniform``: each layer loses round(ratio x layer size) by magnitude.
Patterns (``pattern=``, a ``Pattern`` value or its name) change the unit from a weight to a tile, a
neuron or head, or a 2:4 group: see ``dimap_fast.engine.values`` and ``dimap_fast.engine.units``. A plan of a model (not of a state dict) also prunes to a FLOPs budget:
``ratio_for_flops(reduction)``, see ``dimap_fast.engine.budget``.

Tie rule: units are kept in the order (key descending, layer in natural name order, rank in the
layer), where the key is the score (dimap) or the magnitude (global, uniform) and the rank orders
a layer by magnitude descending, then by flat index. So at the threshold, earlier layers keep their ties
first, and inside a layer the lower flat index stays. round() rounds halves up.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .budget import FlopsBudget, Kept, check_budget_pattern
from .values import Method, Pattern, as_pattern, check_reduction, supported
from ..errors import DimapError, check_choice, check_ratio
from .flops import input_shape
from .prunable import Layer, named_tensors, prunable_layers, weight_version
from .units import UnitLayer, two_four_mask, unit_layers
from .scores import NumpyScorer


MASK_CHUNK = 1 << 16  # elements per |w| pass when masks are built: the buffer stays in cache


@dataclass(frozen=True)
class Cutoff:
    """A layer's cut: keep values > magnitude, then ties at it by flat index, ``keep`` in all.

    For the unstructured pattern the value is |w|; for block and channel it is a unit's energy.
    """

    magnitude: float
    keep: int
    numel: int


class Plan:
    """The ratio-independent part of a pruning run over one model's prunable weights."""

    def __init__(self, layers: list[Layer], method: Method | str, backend: str, progress: bool = False,
                 pattern: Pattern | str = "unstructured", block_size: int | None = None, tensors: dict | None = None,
                 model: torch.nn.Module | None = None):
        self.layers = layers
        self.method = Method.parse(method)
        self.backend = backend
        self.pattern = supported(as_pattern(pattern, block_size))
        self.block_size = self.pattern.block_size  # None unless the pattern is block(B)
        self._counts_cache: dict[float, np.ndarray] = {}
        self._model = model  # run (on the meta device) to count FLOPs; a state dict has nothing to run
        self._versions = _versions(layers)  # FLOPs read the weights later: they must still be these
        self._kept: Kept | None = None
        self._budgets: dict[tuple, FlopsBudget] = {}
        if self.pattern.kind == "n:m":
            self.units: list[UnitLayer] = []
            self.modules = list(dict.fromkeys(layer.module for layer in layers))
            self._scorer = None
            return
        self.units = unit_layers(layers, self.pattern.name, self.block_size, tensors)
        self.modules = list(dict.fromkeys(u.module for u in self.units))
        bar = _progress_bar(sum(u.numel for u in self.units), progress)
        try:
            if backend == "triton":
                from .triton_scores import TritonScorer

                self._scorer = TritonScorer(self.units, self.method.value)
                if bar is not None:
                    bar.update(bar.total)
            else:
                self._scorer = NumpyScorer(self.units, self.method.value, bar)
        finally:
            if bar is not None:
                bar.close()

    def __repr__(self) -> str:
        n = sum(layer.numel for layer in self.layers)
        return (f"Plan(method={str(self.method)!r}, pattern={str(self.pattern)!r}, backend={self.backend!r}, "
                f"layers={len(self.layers)}, weights={n})")

    def _ratio(self, ratio) -> float:
        ratio = check_ratio(ratio)
        fixed = self.pattern.fraction
        if fixed is not None and ratio != fixed:
            share = "half" if fixed == 0.5 else f"{fixed:g}"
            raise DimapError(f"pattern {self.pattern.name!r} always removes {share} of the weights: use ratio {fixed:g}, not {ratio}")
        return ratio

    def keep_counts(self, ratio: float) -> np.ndarray:
        """Per unit layer (in natural name order), how many units stay."""
        ratio = self._ratio(ratio)
        counts = self._counts_cache.get(ratio)
        if counts is None:
            if self._scorer is None:
                counts = np.array([layer.numel // 2 for layer in self.layers], dtype=np.int64)
            else:
                counts = self._floor(self._scorer.keep_counts(ratio))
            if len(self._counts_cache) > 64:
                self._counts_cache.clear()
            self._counts_cache[ratio] = counts
        return counts

    def keep_counts_many(self, ratios) -> np.ndarray:
        """[R, L] keep counts; the GPU path selects every ratio in one launch per group."""
        ratios = [self._ratio(r) for r in ratios]
        if self._scorer is not None and hasattr(self._scorer, "keep_counts_many"):
            return self._floor(self._scorer.keep_counts_many(ratios))
        return np.stack([self.keep_counts(r) for r in ratios]) if ratios else np.zeros((0, len(self.units)), np.int64)

    def _floor(self, counts: np.ndarray) -> np.ndarray:
        # a layer with no neuron or no head left would cut the network: channel keeps one of each
        return np.maximum(counts, 1) if self.pattern.kind == "channel" else counts

    def cutoffs(self, ratio: float) -> dict[str, Cutoff]:
        """Per unit layer: the smallest kept value (inf when nothing stays) and the keep count."""
        counts = self.keep_counts(ratio)
        if self._scorer is None:
            raise DimapError("pattern '2:4' has no cutoffs: every group of 4 keeps its 2 largest weights")
        return {
            u.name: Cutoff(self._scorer.magnitude_at(i, int(c) - 1) if c > 0 else math.inf, int(c), u.numel)
            for i, (u, c) in enumerate(zip(self.units, counts))
        }

    def magnitude_at(self, unit_layer: int, rank: int) -> float:
        """The ``rank``-th largest value (0 = largest) of a unit layer: |w|, a tile's or a channel's energy."""
        if self._scorer is None:
            raise DimapError("pattern '2:4' ranks no values: every group of 4 keeps its 2 largest weights")
        return self._scorer.magnitude_at(unit_layer, rank)

    def thresholds(self, ratio: float) -> dict[str, float]:
        """Per module, the smallest key that stays: the score (dimap) or the magnitude (global).

        ``uniform`` and ``2:4`` have no module threshold (every layer has its own): NaN. A module
        that keeps nothing reports inf.
        """
        counts = self.keep_counts(ratio)
        out = {}
        for module in self.modules:
            if self.method == "uniform" or self._scorer is None:
                out[module] = math.nan
                continue
            keys = [
                self._scorer.key_at(i, int(c) - 1)
                for i, (u, c) in enumerate(zip(self.units, counts))
                if u.module == module and c > 0
            ]
            out[module] = min(keys) if keys else math.inf
        return out

    def masks(self, ratio: float) -> dict[str, torch.Tensor]:
        """Boolean masks keyed by parameter name, True = kept, on the weights' device."""
        ratio = self._ratio(ratio)
        if self._scorer is None:
            return {layer.name: two_four_mask(layer.tensor, layer.name) for layer in self.layers}
        if self.backend == "triton":  # the cuts stay on the device: one apply pass, one host read
            built = self._scorer.masks(ratio)
            return {layer.name: built[layer.name] for layer in self.layers if layer.name in built}
        cuts = self.cutoffs(ratio)
        order = sorted(self.units, key=lambda u: -u.numel)  # largest first balances the workers
        with ThreadPoolExecutor(max_workers=_workers(len(order))) as pool:
            built = list(pool.map(lambda u: layer_mask(u.values, cuts[u.name]), order))
        out = {}
        for u, mask in zip(order, built):
            out.update(u.expand(mask))
        return {layer.name: out[layer.name] for layer in self.layers if layer.name in out}

    @torch.no_grad()
    def prune_(self, ratio: float) -> dict[str, torch.Tensor]:
        """Zero the pruned weights of the planned tensors in place; returns the masks.

        The plan's tensors are the model's own parameters (or the state dict's tensors), so this
        prunes the model itself. On the GPU path one fused kernel per layer writes mask and zeros.
        """
        if self.backend == "triton" and self.pattern.kind == "unstructured":
            from ..kernels import apply_cutoffs

            cuts = self.cutoffs(ratio)
            out = {}
            for layer in self.layers:
                cut = cuts[layer.name]
                flat = layer.tensor.view(-1)
                dev = flat.device
                mask, _ = apply_cutoffs(
                    flat,
                    torch.tensor([0, cut.numel], dtype=torch.int64, device=dev),
                    torch.tensor([cut.magnitude], dtype=torch.float32, device=dev),
                    torch.tensor([cut.keep], dtype=torch.int64, device=dev),
                )
                out[layer.name] = mask.view(layer.tensor.shape)
            return out
        masks = self.masks(ratio)
        for layer in self.layers:
            layer.tensor.mul_(masks[layer.name])
        return masks

    def ratio_for_flops(self, reduction: float, input_size=None) -> float:
        """The smallest ratio whose pruned model removes at least ``reduction`` of the dense FLOPs.

        FLOPs as ``report`` counts them at ``input_size`` (default the model's); for the channel
        pattern, those of the model ``shrink`` builds. A reduction the pattern cannot reach is
        refused with the largest one it can.
        """
        target = check_reduction(reduction)
        return self._budget(input_size).smallest_ratio(target, self.keep_counts)

    def flops_reduction(self, ratio: float, input_size=None) -> float:
        """The share of the dense FLOPs that pruning at ``ratio`` removes, counted as ``ratio_for_flops`` counts."""
        counts = self.keep_counts(ratio)
        return self._budget(input_size).reduction(counts)

    def _budget(self, input_size) -> FlopsBudget:
        check_budget_pattern(self.pattern)
        if self._model is None:
            raise DimapError("this plan was made from a state dict, which cannot be run to count FLOPs: "
                             "plan the model itself, dimap_fast.plan(model), to prune to a FLOPs reduction")
        shape = input_shape(self._model, input_size)
        budget = self._budgets.get(shape)
        if budget is None:
            if self._kept is None:
                if self.pattern.kind != "unstructured" and _versions(self.layers) != self._versions:
                    raise DimapError("the prunable weights changed after planning (prune_, an optimizer step): "
                                     "plan the model again before asking for FLOPs")
                self._kept = Kept(self)
            budget = self._budgets[shape] = FlopsBudget(self, self._kept, self._model, shape)
        return budget

    def sparsity(self, ratio: float) -> dict[str, dict[str, float]]:
        """Fraction of units removed, per module and per unit layer: {"modules": ..., "layers": ...}."""
        counts = self.keep_counts(ratio)
        sized = self.units or self.layers
        layers, kept, size = {}, {}, {}
        for u, c in zip(sized, counts):
            layers[u.name] = 1.0 - int(c) / u.numel
            kept[u.module] = kept.get(u.module, 0) + int(c)
            size[u.module] = size.get(u.module, 0) + u.numel
        modules = {m: 1.0 - kept[m] / size[m] for m in self.modules}
        return {"modules": modules, "layers": layers}


def layer_mask(values: torch.Tensor, cut: Cutoff) -> torch.Tensor:
    """Keep values > cut, then the first ties at the cut by flat index, ``cut.keep`` in all."""
    if cut.keep >= cut.numel:
        return torch.ones(values.shape, dtype=torch.bool, device=values.device)
    if cut.keep <= 0:
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if values.is_cuda:
        return _layer_mask_torch(values, cut)
    # numpy, not torch: torch's CPU reductions over bools measured several times slower here
    flat = values.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    source = flat.numpy()
    threshold = source.dtype.type(cut.magnitude)
    mask = np.empty(source.size, dtype=bool)
    buffer = np.empty(min(MASK_CHUNK, source.size), dtype=source.dtype)
    for start in range(0, source.size, MASK_CHUNK):  # |w| in a cached buffer, never a full copy
        part = source[start : start + MASK_CHUNK]
        mags = np.abs(part, out=buffer[: part.size])
        np.greater(mags, threshold, out=mask[start : start + part.size])
    missing = cut.keep - int(np.count_nonzero(mask))
    for start in range(0, source.size, MASK_CHUNK):  # the first ties by flat index, then stop
        if missing <= 0:
            break
        part = source[start : start + MASK_CHUNK]
        ties = np.flatnonzero(np.abs(part, out=buffer[: part.size]) == threshold)[:missing]
        mask[start + ties] = True
        missing -= ties.size
    return torch.from_numpy(mask).reshape(values.shape)


def _layer_mask_torch(values: torch.Tensor, cut: Cutoff) -> torch.Tensor:
    mags = values.detach().abs()
    if mags.dtype not in (torch.float32, torch.float64):
        mags = mags.float()
    threshold = torch.tensor(cut.magnitude, dtype=mags.dtype, device=values.device)
    mask = mags > threshold
    missing = cut.keep - int(mask.sum())
    if missing > 0:
        ties = torch.nonzero((mags == threshold).reshape(-1)).squeeze(1)[:missing]
        mask.view(-1)[ties] = True
    return mask


def _versions(layers: list[Layer]) -> list[int]:
    return [weight_version(layer.tensor) for layer in layers]  # bumped by every in-place write


def _workers(jobs: int) -> int:
    return max(1, min(jobs, torch.get_num_threads(), os.cpu_count() or 1))


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="w", unit_scale=True, desc="scoring", leave=False)


def plan(model_or_state_dict, method: Method | str = "dimap", device=None, module_map=None, backend: str = "auto",
         progress: bool = False, pattern: Pattern | str = "unstructured", block_size: int | None = None) -> Plan:
    """Score every prunable weight once; the returned Plan cuts at any ratio.

    device: where to score (default: where the weights are). backend: "auto" picks the Triton
    kernels for CUDA weights and numpy otherwise; "triton" forces the kernels (CPU tensors need
    TRITON_INTERPRET=1), "numpy" forces the CPU path. pattern: Pattern.unstructured() (the paper),
    Pattern.block(B) (BxB tiles), Pattern.channel() (neurons and heads) or Pattern.nm(2, 4); or
    their names, "block" with block_size=B (default 32). method: a Method or its name.
    Structured patterns score their few units on the CPU whatever the device. A plan of a model
    keeps a reference to it, to count FLOPs for ``ratio_for_flops``.
    """
    method = Method.parse(method)
    check_choice("backend", backend, ("auto", "numpy", "triton"))
    pattern = supported(as_pattern(pattern, block_size))
    layers = prunable_layers(model_or_state_dict, module_map)
    tensors = named_tensors(model_or_state_dict)
    if isinstance(model_or_state_dict, torch.nn.Module):
        tensors.update({k: v.detach() for k, v in model_or_state_dict.state_dict().items() if k not in tensors})
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise DimapError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
        try:
            layers = [Layer(l.name, l.module, l.tensor.to(device)) for l in layers]
        except (RuntimeError, AssertionError) as exc:
            reason = " ".join(str(exc).split(". ")[0].split())[:100]
            raise DimapError(f"cannot move the weights to {device} ({reason}): pass device='cpu' or a GPU that is present") from None
    on_cuda = layers[0].tensor.is_cuda
    if backend == "auto":
        backend = "triton" if on_cuda and pattern.kind == "unstructured" else "numpy"
    if backend == "triton" and pattern.kind != "unstructured":
        raise DimapError(f"backend='triton' scores the unstructured pattern; pattern {str(pattern)!r} runs on backend='numpy'")
    if backend == "triton" and not on_cuda and not _interpreting():
        raise DimapError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before import; use backend='numpy'")
    model = model_or_state_dict if isinstance(model_or_state_dict, torch.nn.Module) else None
    return Plan(layers, method, backend, progress, pattern, None, tensors, model)


def compute_masks(model_or_state_dict, ratio: float, method: Method | str = "dimap", module_map=None,
                  **kwargs) -> dict[str, torch.Tensor]:
    """Boolean masks (True = kept), one per prunable weight, keyed by parameter name.

    Keyword arguments go to ``plan``: pattern, block_size, device, backend.
    """
    ratio = check_ratio(ratio)
    return plan(model_or_state_dict, method=method, module_map=module_map, **kwargs).masks(ratio)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
