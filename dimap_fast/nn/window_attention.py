"""``WindowAttention``: timm's Swin WindowAttention, with the fused Triton kernel on the GPU.

A subclass of ``timm.models.swin_transformer.WindowAttention``: same constructor, same
``forward(x, mask=None)`` on windows (num_windows*B, N, C), same parameters and state_dict.
On the torch path it *is* timm's forward. On the Triton path the windows are read as a batch of
one-window token maps, and the kernel adds the bias table and the given mask itself.
"""

from __future__ import annotations

import torch
from timm.models import swin_transformer as timm_swin

from .backend import TwoPaths, attention_refusal, dispatch, kernels, scriptable_alias

torch.fx.wrap("dispatch")  # a leaf of traced graphs: the path is chosen when the graph runs


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
        return dispatch(self, x, mask)

    _torch_path = scriptable_alias(timm_swin.WindowAttention.forward, "_torch_path")  # timm's code

    fast_path_trains = True

    def _timm_only(self) -> bool:
        return self.training and self.attn_drop.p > 0  # the kernel has no attention dropout

    def _fast_path_refusal(self, x: torch.Tensor) -> str | None:
        return attention_refusal(self.qkv.out_features // (3 * self.num_heads), x)

    @torch.compiler.disable  # torch.compile: a graph break around the launch (backend.py)
    def _fast_path(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b_, n, _ = x.shape
        wh, ww = self.window_size
        if n != wh * ww:
            raise ValueError(f"expected windows of {wh * ww} tokens, got {n}")
        qkv = self.qkv(x).view(b_, wh, ww, -1)
        # Explicit zero shift: with one window per "image" there is nothing to roll or pad.
        out = kernels().window_attention(qkv, self.relative_position_bias_table, self.num_heads,
                                         self.window_size, 0, mask=mask, scale=self.scale)
        return self.proj_drop(self.proj(out.view(b_, n, -1)))
