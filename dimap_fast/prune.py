"""``prune_``: prune a model in place, to a ratio or to a FLOPs budget, and keep it pruned.

    handle = dimap_fast.prune_(model, 0.5, pattern=Pattern.block(32))
    handle = dimap_fast.prune_(model, FlopsReduction(0.5), pattern=Pattern.channel())
    handle.pruning.ratio          # the ratio used (the one the budget chose)
    handle.remove()               # training over: drop the guards, the zeros stay

It is ``plan`` -> ``Plan.masks`` -> ``apply_masks``, the steps a user would write by hand.
"""

from __future__ import annotations

import torch

from .engine.values import FlopsReduction, Method, Pattern
from .errors import DimapError, check_ratio
from .engine.masks import MaskHandle, Pruning, apply_masks
from .engine.plan import plan


def prune_(model: torch.nn.Module, ratio_or_budget, pattern: Pattern | str = "unstructured",
           method: Method | str = "dimap", *, block_size: int | None = None, module_map=None,
           backend: str = "auto") -> MaskHandle:
    """Zero the pruned weights of ``model`` in place and keep them zero through training.

    ratio_or_budget: the fraction of the prunable units to remove, in [0, 1), or a
    ``FlopsReduction``. pattern and method: values or their names (``block_size`` only with the
    name "block"). Returns the MaskHandle of ``apply_masks``, with ``handle.pruning`` saying what
    was done.
    """
    if not isinstance(model, torch.nn.Module):
        raise DimapError(f"prune_ prunes a torch.nn.Module in place, got {type(model).__name__}: "
                         "for a state dict use compute_masks")
    budget = ratio_or_budget if isinstance(ratio_or_budget, FlopsReduction) else None
    ratio = None if budget is not None else check_ratio(ratio_or_budget)
    p = plan(model, method=method, module_map=module_map, backend=backend, pattern=pattern, block_size=block_size)
    reduction = None
    if budget is not None:
        ratio = p.ratio_for_flops(budget.reduction, budget.input_size)
        reduction = p.flops_reduction(ratio, budget.input_size)
    return apply_masks(model, p.masks(ratio), Pruning(ratio, p.pattern, p.method, reduction))
