"""Hugging Face transformers' Swin and Swinv2 (``SwinForImageClassification``, ``SwinModel``,
``Swinv2ForImageClassification``, ...): every fact dimap_fast needs.

Their attention has separate query, key and value Linears, which together form QKV-M. Two
spellings exist, both handled:
- transformers 5 Swin: ``attention.{q,k,v,o}_proj`` and ``mlp.fc1`` / ``mlp.fc2``, the bias
  table in ``attention.relative_position_bias``;
- Swinv2 (and transformers 4 Swin): ``attention.self.{query,key,value}``,
  ``attention.output.dense``, ``intermediate.dense`` and the block's ``output.dense``; Swinv2's key
  has no bias, and per head a ``logit_scale`` and a row of ``continuous_position_bias_mlp.2``.
A head is rows h*hd..(h+1)*hd of q, k and v (and their biases) and those columns of the output
Linear; a neuron is a row of the first MLP Linear and a column of the second. Both HF attentions
read the head count from ``num_attention_heads`` (and Swinv2 its width from ``all_head_size``),
so shrink updates them. No drop-in modules: ``convert`` swaps only sparse Linears here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from torch import nn

from ..errors import DimapError
from .base import Adapter, block_prefixes, first_present, head_group, member, neuron_group, units_index

# '?' globs for the block's output.dense: '*' would also match attention.output.dense
MODULE_MAP: dict[str, tuple[str, ...]] = {
    "QKV-M": ("*blocks.*.attention.q_proj.weight", "*blocks.*.attention.k_proj.weight",
              "*blocks.*.attention.v_proj.weight", "*blocks.*.attention.self.query.weight",
              "*blocks.*.attention.self.key.weight", "*blocks.*.attention.self.value.weight"),
    "PRJ-M": ("*blocks.*.attention.o_proj.weight", "*blocks.*.attention.output.dense.weight"),
    "MLP-M": ("*blocks.*.mlp.fc1.weight", "*blocks.*.mlp.fc2.weight", "*blocks.*.intermediate.dense.weight",
              "*blocks.?.output.dense.weight", "*blocks.??.output.dense.weight", "*blocks.???.output.dense.weight"),
}

_WEIGHT = re.compile(r"^(.*blocks\.\d+)\.(attention\.(?:[qkvo]_proj|self\.query|self\.key|self\.value|output\.dense)"
                     r"|mlp\.fc1|mlp\.fc2|intermediate\.dense|output\.dense)\.weight$")

# (q, k, v, output, the module holding num_attention_heads), per spelling
_ATTENTION = (("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "attention"),
              ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
               "attention.self"))
_MLP = (("mlp.fc1", "mlp.fc2"), ("intermediate.dense", "output.dense"))

# tensors with one entry per head, under the module holding num_attention_heads: (name, axis)
_PER_HEAD = (("relative_position_bias.relative_position_bias_table", 1), ("relative_position_bias_table", 1),
             ("logit_scale", 0), ("continuous_position_bias_mlp.2.weight", 0))


# the transformers classes of a family that build() makes: prefix (Swin, Swinv2) + one of these
_HEADS = ("ForImageClassification", "Model", "ForMaskedImageModeling", "Backbone")


class HFSwin(Adapter):
    name = "hf-swin"
    module_map = MODULE_MAP
    _package = "transformers.models.swin."
    _prefix = "Swin"

    @classmethod
    def claims_model(cls, model: nn.Module) -> bool:
        return any(type(m).__module__.startswith(cls._package) and type(m).__name__.endswith("Layer")
                   for m in model.modules())

    @classmethod
    def claims_names(cls, names) -> bool:
        return any(_WEIGHT.match(n) and ".attention." in n for n in names) and not HFSwinV2.claims_names(names)

    # -- neuron and head groups -----------------------------------------------------------------

    def groups(self, tensors: dict):
        out = []
        for block, parts in block_prefixes(tensors, _WEIGHT).items():
            for fc1, fc2 in _MLP:
                if {fc1, fc2} <= parts:
                    out.append(neuron_group(block, "mlp", f"{block}.{fc1}", f"{block}.{fc2}", tensors))
            for spelling in _ATTENTION:
                if set(spelling[:4]) <= parts:
                    out.append(self.head_group(block, spelling, tensors))
        if not out:
            raise DimapError("found no complete Hugging Face Swin block (query, key, value and output Linears, "
                             "or both MLP Linears): pattern 'channel' and shrink need whole blocks")
        return out

    def head_group(self, block: str, spelling, tensors: dict):
        q, k, v, o, owner = (f"{block}.{part}" for part in spelling)
        per_head = [(f"{owner}.{name}", axis) for name, axis in _PER_HEAD]
        heads = first_present(tensors, [n for n, _ in per_head], [a for _, a in per_head])
        if heads is None:
            raise DimapError(f"{block}: cannot tell its number of heads (no relative_position_bias_table or logit_scale)")
        width = tensors[f"{q}.weight"].shape[0]
        shapes = [tuple(tensors[f"{p}.weight"].shape) for p in (q, k, v)]
        if width % heads or any(s[0] != width for s in shapes) or tensors[f"{o}.weight"].shape[1] != width:
            raise DimapError(f"{block}: query/key/value {shapes[0]} and output {tuple(tensors[f'{o}.weight'].shape)} "
                             f"do not split into {heads} heads")
        hd = width // heads
        rows, one = units_index(heads, hd), units_index(heads, 1)
        members = []
        for lin in (q, k, v):
            members += [member(tensors, f"{lin}.weight", 0, rows, weight=True), member(tensors, f"{lin}.bias", 0, rows)]
        members.append(member(tensors, f"{o}.weight", 1, rows, weight=True, output=True))
        members += [member(tensors, name, axis, one, score=False) for name, axis in per_head]
        return head_group(block, "attention", heads, members, {"owner": owner, "head_dim": hd})

    # -- shrink ---------------------------------------------------------------------------------

    def after_resize(self, model: nn.Module, group, kept: int) -> None:
        if group.kind != "heads":
            return
        owner = model.get_submodule(group.attrs["owner"])
        owner.num_attention_heads = kept
        if hasattr(owner, "all_head_size"):
            owner.all_head_size = kept * group.attrs["head_dim"]

    # -- building from a recorded config (no download) ---------------------------------------------

    def _classes(self) -> tuple[str, ...]:
        return tuple(self._prefix + head for head in _HEADS)

    def config_of(self, model: nn.Module) -> dict:
        """{"model_class": e.g. SwinForImageClassification, "config": the model's config as JSON}."""
        kind = type(model)
        if kind.__name__ not in self._classes() or not kind.__module__.startswith(self._package):
            raise DimapError(f"cannot record how to rebuild {kind.__name__}: {self.name} rebuilds "
                             f"{', '.join(self._classes())}")
        return {"model_class": kind.__name__, "config": json.loads(model.config.to_json_string(use_diff=False))}

    def build(self, config: Mapping) -> nn.Module:
        import transformers

        name = config.get("model_class") if isinstance(config, Mapping) else None
        if name not in self._classes() or not isinstance(config.get("config"), Mapping):
            raise DimapError(f"cannot rebuild model class {name!r} as {self.name}: it rebuilds "
                             f"{', '.join(self._classes())} from their recorded config")
        try:
            hf_config = getattr(transformers, self._prefix + "Config").from_dict(dict(config["config"]))
            return getattr(transformers, name)(hf_config)
        except (TypeError, ValueError, KeyError) as exc:
            raise DimapError(f"the recorded config does not build transformers' {name} ({exc}): "
                             "the file is damaged or from another version") from None


class HFSwinV2(HFSwin):
    name = "hf-swinv2"
    _package = "transformers.models.swinv2."
    _prefix = "Swinv2"

    @classmethod
    def claims_names(cls, names) -> bool:
        return any(_WEIGHT.match(n) for n in names) and any(
            n.endswith(("attention.self.logit_scale", "continuous_position_bias_mlp.2.weight")) for n in names)
