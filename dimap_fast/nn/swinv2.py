"""SwinV2 drop-ins: timm's cosine window attention on the fused kernel, forward and backward.

SwinV2 scores a token pair by the cosine of q and k times a learned per-head logit scale
(clamped at log 100), plus a continuous position bias: an MLP over log-spaced relative
coordinates, squashed to 16 * sigmoid. Torch computes what is per head or per token (the bias
MLP, the clamp, q and k normalized with the logit scale folded into q); the fused kernel
(dimap_fast.kernels.window_attention with scale 1 and the dense bias) does everything per token
pair. Autograd carries the gradients back through the normalization, the logit scale and the MLP.

``WindowAttentionV2`` keeps timm's ``forward(x, mask)`` on windows; its torch path is timm's code
with one change: the output is reshaped to the attention's own width, so it also runs a shrunk
attention (fewer heads than channels; shrink gives timm's v2 attention this class for that).
``SwinV2Block`` runs its attention on the token map (shift, padding and the region mask in the
kernel). Both only change class (``adopt``), so parameters, buffers and the state_dict stay timm's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models import swin_transformer_v2 as timm_v2

from .backend import TwoPaths, attention_refusal, kernels, runs_fast_path, scriptable_alias
from .fused_block import FusedAttentionBlock
from .window_attention import window_maps

# Leaves of traced graphs: the path is chosen when the graph runs.
torch.fx.wrap("swinv2_window_attention")
torch.fx.wrap("swinv2_attention_half")

_MAX_LOGIT = math.log(1.0 / 0.01)  # timm's clamp of the logit scale


def continuous_position_bias(attn: timm_v2.WindowAttention) -> torch.Tensor:
    """(heads, N, N): timm's 16 * sigmoid(cpb_mlp(relative coordinates)), gathered per pair."""
    n = attn.window_size[0] * attn.window_size[1]
    table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
    bias = table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
    return 16 * torch.sigmoid(bias)


def cosine_qkv(qkv: torch.Tensor, num_heads: int, logit_scale: torch.Tensor) -> torch.Tensor:
    """(..., 3C) with q and k unit-normalized per head and q times the clamped logit scale."""
    q, k, v = qkv.chunk(3, dim=-1)
    heads = q.shape[:-1] + (num_heads, -1)
    scale = torch.clamp(logit_scale, max=_MAX_LOGIT).exp().view(num_heads, 1)
    # Normalized in float32: F.normalize's eps (1e-12) is zero in float16, so a zero vector (the
    # k of timm's padding, whose k bias is zero) would give NaN, as timm's own fp16 path does.
    q = (F.normalize(q.reshape(heads).float(), dim=-1) * scale).flatten(-2)
    k = F.normalize(k.reshape(heads).float(), dim=-1).flatten(-2)
    return torch.cat([q.to(v.dtype), k.to(v.dtype), v], dim=-1)


class WindowAttentionV2(TwoPaths, timm_v2.WindowAttention):
    """SwinV2 window attention (cosine scores, continuous position bias), fused on the GPU."""

    @classmethod
    def adopt(cls, attn: timm_v2.WindowAttention) -> "WindowAttentionV2":
        """Turn a timm SwinV2 WindowAttention into this class in place and return it."""
        if not isinstance(attn, timm_v2.WindowAttention):
            raise ValueError(f"expected timm's SwinV2 WindowAttention, got {type(attn).__name__}")
        attn.__class__ = cls
        return attn

    def qkv_bias(self) -> torch.Tensor | None:
        """The (3C,) bias of the qkv projection (timm keeps q, k, v biases apart), or None."""
        return None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._torch_path(x, mask)
        return swinv2_window_attention(self, x, mask)

    def _torch_path(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """timm's forward, op for op, except that the heads are reshaped to this attention's own
        width (heads x head_dim), not the input's: shrink leaves fewer heads than channels."""
        b_, n, _ = x.shape
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            if self.qkv_bias_separate:
                qkv = self.qkv(x)
                qkv += qkv_bias
            else:
                qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(b_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()  # TorchScript: no globals
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        area = self.window_size[0] * self.window_size[1]
        bias = table[self.relative_position_index.view(-1)].view(area, area, -1).permute(2, 0, 1).contiguous()
        attn = attn + 16 * torch.sigmoid(bias).unsqueeze(0)
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(self.softmax(attn))
        x = (attn @ v).transpose(1, 2).reshape(b_, n, -1)  # timm: reshape(B_, N, C), the input width
        return self.proj_drop(self.proj(x))

    fast_path_trains = True

    def _timm_only(self) -> bool:
        return self.training and self.attn_drop.p > 0  # the kernel has no attention dropout

    def _fast_path_refusal(self, x: torch.Tensor) -> str | None:
        return attention_refusal(self.qkv.out_features // (3 * self.num_heads), x)

    def kernel_inputs(self, x_tokens: torch.Tensor) -> tuple:
        """What the fused kernel takes for a (B, H, W, C) token map: the cosine qkv, the dense
        position bias and the cosine q/k/v of the zero padding (None without a qkv bias)."""
        bias = self.qkv_bias()
        qkv = cosine_qkv(F.linear(x_tokens, self.qkv.weight, bias), self.num_heads,
                         self.logit_scale)
        pad_qkv = None if bias is None else cosine_qkv(bias.to(qkv.dtype), self.num_heads,
                                                       self.logit_scale)
        return qkv, continuous_position_bias(self), pad_qkv


def swinv2_window_attention(attn: WindowAttentionV2, x: torch.Tensor,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """The torch path, or the fused kernel on the windows read as a batch of one-window token maps
    (nothing to roll or pad; the mask, if any, explicit), then the proj Linear."""
    if not runs_fast_path(attn, x):
        return attn._torch_path(x, mask)
    qkv, bias, pad_qkv = attn.kernel_inputs(window_maps(x, attn.window_size))
    out = kernels().FusedWindowAttention.apply(qkv, bias, pad_qkv, mask, attn.num_heads,
                                               attn.window_size, 0, 1.0)
    return attn.proj_drop(attn.proj(out.flatten(1, 2)))


class SwinV2Block(FusedAttentionBlock, timm_v2.SwinTransformerV2Block):
    """SwinV2 block (post-norm, cosine W-MSA / SW-MSA) whose attention runs on the token map."""

    timm_block = timm_v2.SwinTransformerV2Block
    attention = WindowAttentionV2
    _torch_path = scriptable_alias(timm_v2.SwinTransformerV2Block._attn, "_torch_path")

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._torch_path(x)
        return swinv2_attention_half(self, x)


def swinv2_attention_half(block: SwinV2Block, x: torch.Tensor) -> torch.Tensor:
    """timm's ``_attn``, or the fused kernel on the (B, H, W, C) tokens (shift, padding and the
    region mask in the kernel), then the proj Linear."""
    if not runs_fast_path(block, x):
        return block._torch_path(x)
    attn = block.attn
    qkv, bias, pad_qkv = attn.kernel_inputs(x)
    out = kernels().FusedWindowAttention.apply(qkv, bias, pad_qkv, None, attn.num_heads,
                                               block.window_size, block.shift_size, 1.0)
    return attn.proj_drop(attn.proj(out))
