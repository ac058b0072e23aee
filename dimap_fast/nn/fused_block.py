"""What the Swin v1 and v2 drop-in blocks share: adopting timm's block in place, and asking their
attention whether the fused kernel may run (each block's ``_attn`` is in its own file)."""

from __future__ import annotations

import torch

from .backend import TwoPaths


class FusedAttentionBlock(TwoPaths):
    """Mixin before a timm block class; a subclass names ``timm_block`` (the timm class it
    adopts), ``attention`` (the drop-in its ``attn`` becomes), ``_torch_path`` (timm's ``_attn``,
    via ``scriptable_alias``) and ``_attn``. Whether the kernel may run is the attention's call:
    the block asks it."""

    timm_block: type
    attention: type

    @classmethod
    def adopt(cls, block):
        """Turn a timm block into this class in place (it adds no state), its attention into the
        drop-in attention, and return it."""
        if not isinstance(block, cls.timm_block):
            raise ValueError(f"expected timm's {cls.timm_block.__name__}, got {type(block).__name__}")
        cls.attention.adopt(block.attn)
        block.__class__ = cls
        return block

    fast_path_trains = True

    def _timm_only(self) -> bool:
        return self.attn._timm_only()

    def _fast_path_refusal(self, x: torch.Tensor) -> str | None:
        return self.attn._fast_path_refusal(x)
