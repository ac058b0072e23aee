"""timm's Swin Transformer (v1), ``timm.models.swin_transformer``: every fact dimap_fast needs.

In the order data flows: the prunable weights and their DIMAP modules (the paper's Appendix B),
the neuron and head groups of a block, what the shrink surgery changes besides the grouped
tensors, and the drop-ins ``convert`` swaps in. A block is ``*.blocks.N`` with ``attn.qkv``
(q, k and v of every head stacked: rows [q heads | k heads | v heads]), ``attn.proj``,
``mlp.fc1`` and ``mlp.fc2``; its attention keeps one relative-position-bias column per head.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import nn

from ..errors import DimapError
from .base import Adapter, block_prefixes, first_present, head_group, member, neuron_group, units_index

# The built-in map: it also covers swinv2_* and swinv2_cr_* (same weight names).
MODULE_MAP: dict[str, tuple[str, ...]] = {
    "QKV-M": ("*blocks.*.attn.qkv.weight",),
    "PRJ-M": ("*blocks.*.attn.proj.weight",),
    "MLP-M": ("*blocks.*.mlp.fc1.weight", "*blocks.*.mlp.fc2.weight"),
}

_WEIGHT = re.compile(r"^(.*blocks\.\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight$")


class TimmSwin(Adapter):
    name = "timm-swin"
    module_map = MODULE_MAP

    @classmethod
    def claims_model(cls, model: nn.Module) -> bool:
        from timm.models import swin_transformer as timm_swin

        return any(isinstance(m, timm_swin.SwinTransformerBlock) for m in model.modules())

    @classmethod
    def claims_names(cls, names) -> bool:
        return any(n.endswith(".attn.qkv.weight") and _WEIGHT.match(n) for n in names)

    # -- neuron and head groups -----------------------------------------------------------------

    def groups(self, tensors: dict):
        blocks = block_prefixes(tensors, _WEIGHT)
        out = []
        for block, parts in blocks.items():
            if {"mlp.fc1", "mlp.fc2"} <= parts:
                out.append(neuron_group(block, "mlp", f"{block}.mlp.fc1", f"{block}.mlp.fc2", tensors))
            if {"attn.qkv", "attn.proj"} <= parts:
                out.append(self.head_group(block, tensors))
        if not out:
            raise DimapError("found no complete Swin block (mlp.fc1 with mlp.fc2, attn.qkv with attn.proj): "
                             "pattern 'channel' and shrink need a timm or Hugging Face Swin")
        return out

    def head_count(self, block: str, tensors: dict) -> int:
        """Swin stores one relative-position bias column (v1) or logit scale (v2) per head."""
        heads = first_present(tensors, [f"{block}.attn.relative_position_bias_table", f"{block}.attn.logit_scale"], [-1, 0])
        if heads is None:
            raise DimapError(f"{block}: cannot tell its number of heads (no relative_position_bias_table or logit_scale)")
        return heads

    def head_group(self, block: str, tensors: dict):
        attn = f"{block}.attn"
        heads = self.head_count(block, tensors)
        qkv, proj = tensors[f"{attn}.qkv.weight"], tensors[f"{attn}.proj.weight"]
        width = proj.shape[1]  # heads x head_dim (a shrunk model's proj is narrower than its output)
        if qkv.dim() != 2 or proj.dim() != 2 or qkv.shape[0] != 3 * width or width % heads:
            raise DimapError(f"{block}: qkv {tuple(qkv.shape)} and proj {tuple(proj.shape)} do not split into {heads} heads")
        hd = width // heads
        rows = units_index(heads, hd, (0, width, 2 * width))  # a head's q, k and v rows
        cols = units_index(heads, hd)
        one = units_index(heads, 1)
        members = [member(tensors, f"{attn}.qkv.weight", 0, rows, weight=True),
                   member(tensors, f"{attn}.qkv.bias", 0, rows),
                   member(tensors, f"{attn}.proj.weight", 1, cols, weight=True, output=True)]
        members += self.head_extras(attn, tensors, heads, hd, cols, one)
        return head_group(block, "attn", heads, members, {"attn": attn})

    def head_extras(self, attn: str, tensors: dict, heads: int, hd: int, cols, one) -> list:
        return [member(tensors, f"{attn}.relative_position_bias_table", 1, one, score=False)]

    # -- shrink ---------------------------------------------------------------------------------

    def check_shrink(self, model: nn.Module) -> None:
        from timm.models import swin_transformer as timm_swin

        for name, mod in model.named_modules():
            if name.endswith(".attn") and hasattr(mod, "qkv") and not isinstance(mod, timm_swin.WindowAttention):
                raise DimapError(f"{name}: shrink supports timm's SwinTransformer (v1) attention here, "
                                 f"not {type(mod).__name__}")

    def after_resize(self, model: nn.Module, group, kept: int) -> None:
        if group.kind != "heads":
            return
        attn = model.get_submodule(group.attrs["attn"])
        attn.num_heads = kept
        if hasattr(attn, "fused_attn"):
            # timm's SDPA path (off by default for Swin): the scale, bias/mask add and softmax in one
            # op. Channel pruning leaves the first stage whole, and its attention bookkeeping then
            # dominates the shrunk model's CPU time (profiled: 64% of stage 0 is not GEMM).
            attn.fused_attn = True

    # -- building ---------------------------------------------------------------------------------

    def build(self, config: Mapping) -> nn.Module:
        """timm's SwinTransformer from its kwargs (the demo model's, or those a checkpoint records)."""
        from timm.models import swin_transformer as timm_swin

        return build_timm(timm_swin.SwinTransformer, config)


def build_swin(config: Mapping) -> nn.Module:
    """A timm SwinTransformer from kwargs, e.g. those stored in a checkpoint's metadata."""
    return TimmSwin().build(config)


def build_timm(cls, config: Mapping) -> nn.Module:
    """``cls`` (a timm Swin class) from its kwargs, as a checkpoint's metadata records them."""
    if not isinstance(config, Mapping):
        raise DimapError(f"a model config is a dict of {cls.__name__} kwargs, got {type(config).__name__}")
    config = dict(config)
    for key in ("depths", "num_heads"):  # JSON turns tuples into lists; timm indexes either
        if key in config:
            config[key] = tuple(config[key])
    try:
        return cls(**config)
    except (TypeError, ValueError) as exc:
        raise DimapError(f"the recorded model config does not build timm's {cls.__name__} ({exc}): "
                         "the file is damaged or from another version") from None
