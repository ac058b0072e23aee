"""The one guard that keeps pruned weights at zero: ``apply_masks``, the trainer and fine-tuning use it.

A ``MaskHandle`` zeroes the masked weights, then holds them at zero two ways: a gradient hook
zeroes their gradients (so AdamW's moments, clipping and loss scaling see only kept weights), and
a global optimizer step hook re-zeroes them after every step of any torch optimizer (weight decay
and momentum left from before the masks would otherwise revive them). ``check()`` proves it held
(``MaskLeakError`` if not); ``remove()`` drops both guards and leaves plain dense tensors that
happen to hold zeros: nothing in the state dict changes. ``pruning`` says how the masks were
chosen when ``prune_`` chose them (None for masks a caller brought).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .values import Method, Pattern
from ..errors import DimapError

_GUARDS: "weakref.WeakSet[MaskHandle]" = weakref.WeakSet()
_STEP_HOOK = None


@dataclass(frozen=True)
class Pruning:
    """How a handle's masks were chosen: the ratio (the one a budget chose), and for a budget the
    share of the FLOPs it removes, counted as report() counts it."""

    ratio: float
    pattern: Pattern
    method: Method
    flops_reduction: float | None = None  # None when a ratio was given

    def __post_init__(self):
        object.__setattr__(self, "pattern", Pattern.parse(self.pattern))
        object.__setattr__(self, "method", Method.parse(self.method))


class MaskLeakError(RuntimeError):
    """A pruned weight is no longer exactly zero: a bug, never bad input."""


class MaskHandle:
    """Masks (True = kept) bound to a model's parameters and held at zero until ``remove()``.

    Also a context manager: ``with MaskHandle(model, masks) as guard:`` removes it on the way out.
    """

    def __init__(self, model: torch.nn.Module, masks: Mapping[str, torch.Tensor], device=None,
                 pruning: Pruning | None = None):
        if pruning is not None and not isinstance(pruning, Pruning):
            raise DimapError(f"pruning must be a dimap_fast.Pruning or None, got {type(pruning).__name__}")
        self.items = bind_masks(model, masks, device)
        self.pruning = pruning
        self.zero_()
        self._grad_hooks = [p.register_hook(_masked_grad(keep)) for _, p, keep in self.items if p.requires_grad]
        _GUARDS.add(self)
        _ensure_step_hook()

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The masks on the CPU, by parameter name (what a checkpoint stores)."""
        return {name: keep.cpu() for name, _, keep in self.items}

    @torch.no_grad()
    def zero_(self) -> None:
        for _, p, keep in self.items:
            if keep.device != p.device:  # the model moved after the masks were bound
                keep.data = keep.to(p.device)
            p.mul_(keep)

    @torch.no_grad()
    def check(self, where: str = "") -> None:
        """Raise MaskLeakError naming every layer whose pruned weights are not all exactly zero."""
        if not self.items:
            return
        counts = torch.stack([torch.count_nonzero(p.masked_fill(keep, 0)) for _, p, keep in self.items])
        if int(counts.sum()):  # one sync for all layers
            bad = {name: int(c) for (name, *_), c in zip(self.items, counts.tolist()) if c}
            raise MaskLeakError(f"pruned weights became nonzero{' ' + where if where else ''}: {bad}")

    def remove(self) -> None:
        """Stop guarding: later optimizer steps may move the pruned weights again."""
        for hook in self._grad_hooks:
            hook.remove()
        self._grad_hooks = []
        _GUARDS.discard(self)

    @property
    def active(self) -> bool:
        return self in _GUARDS

    def __enter__(self) -> "MaskHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _masked_grad(keep: torch.Tensor):
    # ``keep`` is read at call time, so a mask that zero_() moved to the model's new device is used
    return lambda grad: grad * keep


def _after_step(optimizer, args, kwargs) -> None:
    for handle in list(_GUARDS):
        handle.zero_()


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


def apply_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor], pruning: Pruning | None = None) -> MaskHandle:
    """Zero every weight whose mask is False, in place, and keep it zero through training.

    Returns a MaskHandle: ``handle.remove()`` (or ``make_permanent(model)``) drops the guards once
    training is over; ``handle.pruning`` is ``pruning`` (how the masks were chosen, if known).
    Masks are checked against the model before anything is touched.
    """
    handle = MaskHandle(model, masks, pruning=pruning)
    previous = getattr(model, "_dimap_handles", [])
    model._dimap_handles = previous + [handle]
    return handle


def make_permanent(model: torch.nn.Module) -> None:
    """Drop every guard ``apply_masks`` put on ``model``; pruned weights stay zero."""
    for handle in getattr(model, "_dimap_handles", []):
        handle.zero_()
        handle.remove()
    model._dimap_handles = []


def removed_fraction(masks: Mapping[str, torch.Tensor]) -> float:
    """Share of the masked weights that are pruned (False), over all masks together."""
    total = sum(m.numel() for m in masks.values())
    return sum(int((~m).sum()) for m in masks.values()) / total if total else 0.0


def prune_state(state: dict, masks: dict) -> dict:
    """A copy of the state dict with pruned weights zeroed; the input tensors are untouched."""
    out = dict(state)
    for name, mask in masks.items():
        out[name] = state[name] * mask.to(state[name].device)
    return out


def masked_copy(model: torch.nn.Module, masks: dict) -> torch.nn.Module:
    """A copy of ``model`` with the pruned weights zeroed (no guards); ``model`` is untouched."""
    import copy

    out = copy.deepcopy(model)
    out.load_state_dict(prune_state(out.state_dict(), masks))
    return out
