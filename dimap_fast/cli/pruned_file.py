"""The prune-to-file pipeline that ``prune`` and ``sweep`` share: a source loaded and checked,
then its masks at a ratio written as one pruned checkpoint with what made it."""

from __future__ import annotations

import json

from ..engine.budget import flops_metadata
from ..errors import DimapError
from ..io.checkpoint import save_pruned
from ..io.models import Source, check_architecture, load_source, model_config


def load_checked(spec: str, arch: str | None, budget_flag: str | None = None, pretrained: bool = False) -> Source:
    """``load_source``, refusing a checkpoint that does not fit ``arch`` and, where a FLOPs budget
    (``budget_flag``) needs a model to run, a source that names no architecture."""
    src = load_source(spec, arch=arch, need_model=budget_flag is not None, pretrained=pretrained)
    if budget_flag is not None and src.model is None:
        count = "counts" if budget_flag == "--flops-reduction" else "count"
        raise DimapError(f"{budget_flag} {count} FLOPs by running the architecture, and {spec} names none: "
                         "pass --model NAME")
    if src.path is not None and src.arch and src.model is None:
        check_architecture({k: tuple(v.shape) for k, v in src.state_dict.items()}, src.arch, src.path)
    return src


def write_pruned(out, src: Source, spec: str, plan, method: str, ratio: float, target: float | None = None,
                 masks_only: bool = False):
    """Save ``plan``'s masks at ``ratio`` (and the pruned weights, unless ``masks_only``) to ``out``;
    ``target``: the FLOPs reduction that chose the ratio. Returns the masks."""
    masks = plan.masks(ratio)
    meta = {"method": method, "ratio": repr(ratio), "source": spec, "timm_model": src.arch or "",
            **plan.pattern.metadata()}
    if target is not None:
        meta.update(flops_metadata(plan, target, ratio))
    if model_config(src.metadata):
        meta["model_config"] = json.dumps(model_config(src.metadata))
    save_pruned(out, {} if masks_only else src.state_dict, masks, meta)  # pruned as it is written: no copy
    return masks
