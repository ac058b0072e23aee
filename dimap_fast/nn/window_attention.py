"""``WindowAttention``: timm's Swin WindowAttention, with the fused Triton kernel on the GPU.

A subclass of ``timm.models.swin_transformer.WindowAttention``: same constructor, same
``forward(x, mask=None)`` on windows (num_windows*B, N, C), same parameters and state_dict.
On the torch path it *is* timm's forward. On the Triton path the windows are read as a batch of
one-window token maps, and the kernel adds the bias table and the given mask itself.
"""

from __future__ import annotations

import torch
from timm.models import swin_transformer as timm_swin

from .backend import TwoPaths, attention_refusal, kernels, runs_fast_path, scriptable_alias

torch.fx.wrap("swin_window_attention")  # a leaf of traced graphs: the path is chosen when the graph runs


class WindowAttention(TwoPaths, timm_swin.WindowAttention):
    """Window multi-head self-attention with relative position bias (W-MSA / SW-MSA)."""

    @classmethod
    def adopt(cls, attn: timm_swin.WindowAttention) -> "WindowAttention":
        """Turn a timm WindowAttention into this class in place (it adds no state) and return it."""
        if not isinstance(attn, timm_swin.WindowAttention):
            raise ValueError(f"expected timm's WindowAttention, got {type(attn).__name__}")
        attn.__class__ = cls
        return attn

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._torch_path(x, mask)
        return swin_window_attention(self, x, mask)

    _torch_path = scriptable_alias(timm_swin.WindowAttention.forward, "_torch_path")  # timm's code

    fast_path_trains = True

    def _timm_only(self) -> bool:
        return self.training and self.attn_drop.p > 0  # the kernel has no attention dropout

    def _fast_path_refusal(self, x: torch.Tensor) -> str | None:
        return attention_refusal(self.qkv.out_features // (3 * self.num_heads), x)


def swin_window_attention(attn: WindowAttention, x: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """timm's forward, or the qkv Linear, the fused kernel on the windows read as a batch of
    one-window token maps (nothing to roll or pad: zero shift, the mask if any explicit) and the
    proj Linear."""
    if not runs_fast_path(attn, x):
        return attn._torch_path(x, mask)
    out = kernels().FusedWindowAttention.apply(attn.qkv(window_maps(x, attn.window_size)),
                                               attn.relative_position_bias_table, None, mask,
                                               attn.num_heads, attn.window_size, 0, attn.scale)
    return attn.proj_drop(attn.proj(out.flatten(1, 2)))


def window_maps(x: torch.Tensor, window_size) -> torch.Tensor:
    """Windows (num_windows*B, N, C) viewed as a batch of one-window token maps (.., wh, ww, C)."""
    b_, n, c = x.shape
    wh, ww = window_size
    if n != wh * ww:
        raise ValueError(f"expected windows of {wh * ww} tokens, got {n}")
    return x.view(b_, wh, ww, c)
