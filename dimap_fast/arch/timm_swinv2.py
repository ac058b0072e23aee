"""timm's Swin Transformer V2, ``timm.models.swin_transformer_v2`` (and swinv2_cr's weight names).

The same blocks and weight names as v1 (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``), so
the same module map. What differs, in the order data flows:
- a head's qkv bias lives in ``q_bias`` and ``v_bias`` (parameters) and ``k_bias`` (a zero,
  non-persistent buffer), each [heads x head_dim]; swinv2_cr keeps one ``qkv.bias``;
- per head there is a ``logit_scale`` row and a row of the continuous-position-bias MLP's last
  Linear (``cpb_mlp.2``), instead of a bias-table column;
- timm's forward reshapes the attention output to the input width, which a shrunk attention no
  longer has: shrink turns the attention into ``ShrunkWindowAttention`` (the same forward, the
  output reshaped to its own width). swinv2_cr's attention is not shrunk.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from timm.models import swin_transformer_v2 as timm_v2

from ..errors import DimapError
from .base import member
from .timm_swin import TimmSwin

_V2_NAME = re.compile(r"blocks\.\d+\.attn\.(logit_scale|q_bias|cpb_mlp\.\d+\.weight)$")


class TimmSwinV2(TimmSwin):
    name = "timm-swinv2"

    @classmethod
    def claims_model(cls, model: nn.Module) -> bool:
        return any(isinstance(m, timm_v2.SwinTransformerV2Block) or type(m).__name__ == "SwinTransformerV2CrBlock"
                   for m in model.modules())

    @classmethod
    def claims_names(cls, names) -> bool:
        return any(_V2_NAME.search(n) for n in names)

    # -- neuron and head groups: v1's, with v2's per-head tensors ----------------------------------

    def head_extras(self, attn: str, tensors: dict, heads: int, hd: int, cols, one) -> list:
        return [member(tensors, f"{attn}.q_bias", 0, cols),
                member(tensors, f"{attn}.v_bias", 0, cols),
                member(tensors, f"{attn}.k_bias", 0, cols, score=False),  # zeros; a model's buffer only
                member(tensors, f"{attn}.logit_scale", 0, one, score=False),
                member(tensors, f"{attn}.cpb_mlp.2.weight", 0, one, score=False)]

    # -- shrink ---------------------------------------------------------------------------------

    def check_shrink(self, model: nn.Module) -> None:
        for name, mod in model.named_modules():
            if name.endswith(".attn") and hasattr(mod, "qkv") and not isinstance(mod, timm_v2.WindowAttention):
                raise DimapError(f"{name}: shrink supports timm's SwinTransformerV2 attention (swinv2_*), "
                                 f"not {type(mod).__name__} (swinv2_cr_*): prune it unstructured or by blocks")

    def after_resize(self, model: nn.Module, group, kept: int) -> None:
        if group.kind != "heads":
            return
        attn = model.get_submodule(group.attrs["attn"])
        attn.num_heads = kept
        if type(attn) is timm_v2.WindowAttention:
            attn.__class__ = ShrunkWindowAttention

    # -- convert ----------------------------------------------------------------------------------

    def swaps(self) -> dict:
        from ..nn.swinv2 import SwinV2Block, WindowAttentionV2  # nn sits above arch: imported on demand

        return {timm_v2.SwinTransformerV2Block: SwinV2Block, timm_v2.WindowAttention: WindowAttentionV2}


class ShrunkWindowAttention(timm_v2.WindowAttention):
    """timm's SwinV2 window attention whose heads x head_dim may be narrower than its input."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
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
        attn = attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
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
