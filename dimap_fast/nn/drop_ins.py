"""The registry of drop-ins: per architecture adapter (``dimap_fast.arch``), which class each
timm class becomes. ``convert`` swaps by it; ``shrink`` and ``load_shrunk`` give a shrunk SwinV2
attention its drop-in (timm's v2 forward reshapes to the input's width, the drop-in to its own).

Exact types: a subclass of a timm class may change the forward, so it keeps its own code.
"""

from __future__ import annotations

from timm import layers as timm_layers
from timm.models import swin_transformer as timm_swin
from timm.models import swin_transformer_v2 as timm_v2
from torch import nn

from .patch_layers import PatchEmbed, PatchMerging
from .swin_block import SwinBlock
from .swinv2 import SwinV2Block, WindowAttentionV2
from .window_attention import WindowAttention

DROP_INS: dict[str, dict[type, type]] = {
    "timm-swin": {timm_swin.SwinTransformerBlock: SwinBlock, timm_swin.WindowAttention: WindowAttention,
                  timm_swin.PatchMerging: PatchMerging, timm_layers.PatchEmbed: PatchEmbed},
    "timm-swinv2": {timm_v2.SwinTransformerV2Block: SwinV2Block, timm_v2.WindowAttention: WindowAttentionV2},
}
SHRUNK = {timm_v2.WindowAttention: WindowAttentionV2}  # classes whose forward cannot run fewer heads


def drop_ins_for(adapter_name: str) -> dict[type, type]:
    """{timm class: drop-in that adopts it in place} for one family; empty where it has none."""
    return DROP_INS.get(adapter_name, {})


def fit_shrunk(model: nn.Module) -> nn.Module:
    """Give every module whose timm forward cannot run a shrunk width its drop-in, in place."""
    for module in model.modules():
        if type(module) in SHRUNK:
            SHRUNK[type(module)].adopt(module)
    return model
