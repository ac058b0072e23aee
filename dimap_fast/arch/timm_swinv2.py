"""timm's Swin Transformer V2, ``timm.models.swin_transformer_v2`` (and swinv2_cr's weight names).

The same blocks and weight names as v1 (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``), so
the same module map. What differs, in the order data flows:
- a head's qkv bias lives in ``q_bias`` and ``v_bias`` (parameters) and ``k_bias`` (a zero,
  non-persistent buffer), each [heads x head_dim]; swinv2_cr keeps one ``qkv.bias``;
- per head there is a ``logit_scale`` row and a row of the continuous-position-bias MLP's last
  Linear (``cpb_mlp.2``), instead of a bias-table column;
- timm's forward reshapes the attention output to the input width, which a shrunk attention no
  longer has: ``shrink`` and ``load_shrunk`` then give the attention its drop-in
  (``dimap_fast.nn.drop_ins.fit_shrunk``: timm's forward with the output reshaped to its own
  width). swinv2_cr's attention is not shrunk.
"""

from __future__ import annotations

import re

from torch import nn
from timm.models import swin_transformer_v2 as timm_v2

from ..errors import DimapError
from .base import member
from .timm_swin import TimmSwin, build_timm

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

    # -- building ---------------------------------------------------------------------

    def build(self, config) -> nn.Module:
        """timm's SwinTransformerV2 from its kwargs."""
        return build_timm(timm_v2.SwinTransformerV2, config)
