"""``SwinBlock``: timm's SwinTransformerBlock whose attention half runs on the token map.

Only the attention half (timm's ``_attn``, normed tokens in, attention output out) changes; the
residuals and the MLP are timm's forward. On the Triton path the block computes the qkv Linear
on the (B, H, W, C) tokens, then one fused kernel does shift, partition, bias, region mask,
softmax, P.V, reverse partition and reverse shift; no roll, pad, partition or reverse copies are
made. The output projection also runs on tokens (a row-wise Linear commutes with the token
permutation). On the torch path it is timm's ``_attn``. For float32 inference on the CPU, the
whole block runs cpu_inference.py's path (a few images at a time, fewer passes over memory).
"""

from __future__ import annotations

import torch
from timm.models import swin_transformer as timm_swin

from . import cpu_inference
from .backend import kernels, runs_fast_path, scriptable_alias
from .fused_block import FusedAttentionBlock
from .window_attention import WindowAttention

torch.fx.wrap("swin_attention_half")  # a leaf of traced graphs: the path is chosen when the graph runs


class SwinBlock(cpu_inference.OnCpuPath, FusedAttentionBlock, timm_swin.SwinTransformerBlock):
    """Swin Transformer block (W-MSA or SW-MSA, then MLP) with a fused attention fast path."""

    timm_block = timm_swin.SwinTransformerBlock
    attention = WindowAttention
    _torch_path = scriptable_alias(timm_swin.SwinTransformerBlock._attn, "_torch_path")
    _timm_forward = scriptable_alias(timm_swin.SwinTransformerBlock.forward, "_timm_forward")
    _cpu_path = cpu_inference.runs
    _cpu_forward = cpu_inference.forward

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._torch_path(x)
        return swin_attention_half(self, x)


def swin_attention_half(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """timm's ``_attn``, or the qkv Linear on the (B, H, W, C) tokens, the fused kernel (its
    autograd Function) and the proj Linear."""
    if not runs_fast_path(block, x):
        return block._torch_path(x)
    attn = block.attn
    a = kernels().FusedWindowAttention.apply(attn.qkv(x), attn.relative_position_bias_table,
                                             attn.qkv.bias, None, attn.num_heads,
                                             block.window_size, block.shift_size, attn.scale)
    return attn.proj_drop(attn.proj(a))
