"""``SwinBlock``: timm's SwinTransformerBlock whose attention half runs on the token map.

Only the attention half (timm's ``_attn``, normed tokens in, attention output out) changes; the
residuals and the MLP are timm's forward. On the Triton path the block computes the qkv Linear
on the (B, H, W, C) tokens, then one fused kernel does shift, partition, bias, region mask,
softmax, P.V, reverse partition and reverse shift; no roll, pad, partition or reverse copies are
made. The output projection also runs on tokens (a row-wise Linear commutes with the token
permutation). On the torch path it is timm's ``_attn``.
"""

from __future__ import annotations

import torch
from timm.models import swin_transformer as timm_swin

from .backend import dispatch, kernels, scriptable_alias
from .window_attention import WindowAttention

torch.fx.wrap("dispatch")  # a leaf of traced graphs: the path is chosen when the graph runs


class SwinBlock(timm_swin.SwinTransformerBlock):
    """Swin Transformer block (W-MSA or SW-MSA, then MLP) with a fused attention fast path."""

    @classmethod
    def adopt(cls, block: timm_swin.SwinTransformerBlock) -> "SwinBlock":
        """Turn a timm block into this class in place (it adds no state), its attention into
        dimap_fast.nn.WindowAttention, and return it."""
        if not isinstance(block, timm_swin.SwinTransformerBlock):
            raise ValueError(f"expected timm's SwinTransformerBlock, got {type(block).__name__}")
        WindowAttention.adopt(block.attn)
        block.__class__ = cls
        return block

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._torch_path(x)
        return dispatch(self, x)

    _torch_path = scriptable_alias(timm_swin.SwinTransformerBlock._attn, "_torch_path")

    def _use_triton(self, x: torch.Tensor) -> bool:
        return self.attn._use_triton(x)

    def _triton_path(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        a = kernels().window_attention(attn.qkv(x), attn.relative_position_bias_table,
                                       attn.num_heads, self.window_size, self.shift_size,
                                       qkv_bias=attn.qkv.bias, scale=attn.scale)
        return attn.proj_drop(attn.proj(a))
