"""``SwinBlock``: timm's SwinTransformerBlock whose attention half runs on the token map.

Only the attention half (timm's ``_attn``, normed tokens in, attention output out) changes; the
residuals and the MLP are timm's forward. On the Triton path the block computes the qkv Linear
on the (B, H, W, C) tokens, then one fused kernel does shift, partition, bias, region mask,
softmax, P.V, reverse partition and reverse shift; no roll, pad, partition or reverse copies are
made. The output projection also runs on tokens (a row-wise Linear commutes with the token
permutation). On the torch path it is timm's ``_attn``. For float32 inference on the CPU, the
whole block runs cpu_inference.py's path (a few images at a time, fused Linear epilogues).
"""

from __future__ import annotations

import torch
from timm.models import swin_transformer as timm_swin

from . import cpu_inference
from .backend import kernels, scriptable_alias
from .fused_block import FusedAttentionBlock
from .window_attention import WindowAttention


class SwinBlock(cpu_inference.OnCpuPath, FusedAttentionBlock, timm_swin.SwinTransformerBlock):
    """Swin Transformer block (W-MSA or SW-MSA, then MLP) with a fused attention fast path."""

    timm_block = timm_swin.SwinTransformerBlock
    attention = WindowAttention
    _torch_path = scriptable_alias(timm_swin.SwinTransformerBlock._attn, "_torch_path")
    _timm_forward = scriptable_alias(timm_swin.SwinTransformerBlock.forward, "_timm_forward")
    _cpu_path = cpu_inference.runs
    _cpu_forward = cpu_inference.forward

    @torch.compiler.disable  # torch.compile: a graph break around the launch (backend.py)
    def _fast_path(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        a = kernels().window_attention(attn.qkv(x), attn.relative_position_bias_table,
                                       attn.num_heads, self.window_size, self.shift_size,
                                       qkv_bias=attn.qkv.bias, scale=attn.scale)
        return attn.proj_drop(attn.proj(a))
