"""Zero pruned weights in place and keep them zero through training.

``apply_masks`` zeroes the weights, then guards them two ways: a gradient hook zeroes their
gradients (so clipping and loss scaling see the pruned model), and a global optimizer step hook
re-zeroes them after every step of any torch optimizer (weight decay and stale momentum would
otherwise revive them). ``handle.remove()`` or ``make_permanent(model)`` drops the guards and
leaves plain dense tensors that happen to hold zeros: nothing in the state dict changes.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch

from .errors import DimapError

_GUARDS: "weakref.WeakSet[MaskHandle]" = weakref.WeakSet()
_STEP_HOOK = None


class MaskHandle:
    """The guards one ``apply_masks`` call put on a model; ``remove()`` makes pruning permanent."""

    def __init__(self, pairs: list[tuple[torch.nn.Parameter, torch.Tensor]]):
        self.pairs = pairs
        self._grad_hooks = [p.register_hook(_zero_grad_hook(m)) for p, m in pairs if p.requires_grad]
        _GUARDS.add(self)
        _ensure_step_hook()

    @torch.no_grad()
    def reapply(self) -> None:
        for p, m in self.pairs:
            p.mul_(m)

    def remove(self) -> None:
        for hook in self._grad_hooks:
            hook.remove()
        self._grad_hooks = []
        _GUARDS.discard(self)

    @property
    def active(self) -> bool:
        return self in _GUARDS


def _zero_grad_hook(mask: torch.Tensor):
    return lambda grad: grad * mask


def _after_step(optimizer, args, kwargs) -> None:
    for handle in list(_GUARDS):
        handle.reapply()


def _ensure_step_hook() -> None:
    global _STEP_HOOK
    if _STEP_HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _STEP_HOOK = register_optimizer_step_post_hook(_after_step)


def bind_masks(model: torch.nn.Module, masks, device=None) -> list[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """(name, parameter, mask on the parameter's device) for every mask, all checked first."""
    if not isinstance(model, torch.nn.Module):
        raise DimapError(f"masks apply to a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(masks, Mapping):
        raise DimapError(f"masks must be a dict of parameter name -> bool tensor, got {type(masks).__name__}")
    params = dict(model.named_parameters())
    bound = []
    for name, mask in masks.items():
        if name not in params:
            raise DimapError(f"mask {name!r} names no parameter of this model: were the masks made for another model?")
        p = params[name]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != p.shape:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise DimapError(f"mask {name!r} must be a bool tensor of shape {tuple(p.shape)}, got {shape}")
        bound.append((name, p, mask.to(device if device is not None else p.device)))
    return bound


@torch.no_grad()
def apply_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> MaskHandle:
    """Zero every weight whose mask is False, in place, and keep it zero through training.

    Returns a MaskHandle: ``handle.remove()`` (or ``make_permanent(model)``) drops the guards once
    training is over. Masks are checked against the model before anything is touched.
    """
    pairs = [(p, m) for _, p, m in bind_masks(model, masks)]
    for p, m in pairs:
        p.mul_(m)
    handle = MaskHandle(pairs)
    previous = getattr(model, "_dimap_handles", [])
    model._dimap_handles = previous + [handle]
    return handle


def make_permanent(model: torch.nn.Module) -> None:
    """Drop every guard ``apply_masks`` put on ``model``; pruned weights stay zero."""
    for handle in getattr(model, "_dimap_handles", []):
        handle.reapply()
        handle.remove()
    model._dimap_handles = []


def prune_state(state: dict, masks: dict) -> dict:
    """A copy of the state dict with pruned weights zeroed; the input tensors are untouched."""
    out = dict(state)
    for name, mask in masks.items():
        out[name] = state[name] * mask.to(state[name].device)
    return out
