"""``SwinBlock``: timm's SwinTransformerBlock whose attention half runs on the token map.

On the Triton path the block computes the qkv Linear on the (B, H, W, C) tokens, then one fused
kernel does shift, partition, bias, region mask, softmax, P.V, reverse partition and reverse shift;
no roll, pad, partition or reverse copies are made. The output projection also runs on tokens
(a row-wise Linear commutes with the token permutation). On the torch path it is timm's forward.
"""

from __future__ import annotations

import torch
from timm.models import swin_transformer as timm_swin

from .backend import kernels
from .window_attention import WindowAttention


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        if (self.training and attn.attn_drop.p > 0) or not attn.fast_path(x, self.norm1.weight):
            return super().forward(x)
        b, h, w, c = x.shape
        qkv = attn.qkv(self.norm1(x))
        a = kernels().window_attention(qkv, attn.relative_position_bias_table, attn.num_heads,
                                       self.window_size, self.shift_size,
                                       qkv_bias=attn.qkv.bias, scale=attn.scale)
        x = x + self.drop_path1(attn.proj_drop(attn.proj(a)))
        x = x.reshape(b, -1, c)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(b, h, w, c)
