"""Architecture adapters: every fact about a model family in one file per family.

``find_adapter(source)`` recognizes the family from the model's classes, or from a state dict's
parameter names; ``find_adapter(source, arch="hf-swin")`` names it. A module map given by the user
overrides the prunable set; on a model no adapter recognizes it makes a ``Generic`` adapter.
See ``base.py`` for what an adapter provides.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..errors import DimapError
from .base import Adapter, Group, Member, natural_key
from .generic import Generic
from .hf_swin import HFSwin, HFSwinV2
from .timm_swin import TimmSwin
from .timm_swinv2 import TimmSwinV2

# most specific first: names tell v2 from v1 only by v2's extra per-head tensors
FAMILIES: tuple[type[Adapter], ...] = (HFSwinV2, HFSwin, TimmSwinV2, TimmSwin)
ADAPTERS: dict[str, type[Adapter]] = {cls.name: cls for cls in FAMILIES}
DEFAULT = TimmSwin  # what a source no adapter recognizes gets (its messages say it is not a Swin)


def find_adapter(source=None, arch=None, module_map=None) -> Adapter:
    """The adapter of ``source`` (a model, a state dict or parameter names), or the one ``arch`` names.

    ``arch``: an Adapter, or one of 'timm-swin', 'timm-swinv2', 'hf-swin', 'hf-swinv2', 'generic'
    (which needs ``module_map``). Nothing recognized: ``Generic(module_map)`` when a map is given,
    else the timm Swin adapter, whose prunable set then finds nothing and says so.
    """
    if isinstance(arch, Adapter):
        return arch
    if arch is not None:
        if arch == "generic":
            if module_map is None:
                raise DimapError("arch='generic' needs module_map={'MODULE': ['glob', ...]} naming the prunable weights")
            return Generic(module_map)
        if arch not in ADAPTERS:
            raise DimapError(f"unknown arch {arch!r}: choose one of {', '.join([*ADAPTERS, 'generic'])}")
        return ADAPTERS[arch]()
    if isinstance(source, nn.Module):
        for cls in FAMILIES:
            if cls.claims_model(source):
                return cls()
        names = [n for n, _ in source.named_parameters()]
    elif isinstance(source, Mapping):
        names = [str(n) for n in source]
    else:
        names = [str(n) for n in (source or ())]
    for cls in FAMILIES:
        if cls.claims_names(names):
            return cls()
    return Generic(module_map) if module_map is not None else DEFAULT()


SWIN_MODULES: dict[str, tuple[str, ...]] = dict(TimmSwin.module_map)  # timm Swin's map: the default

__all__ = ["ADAPTERS", "SWIN_MODULES", "Adapter", "FAMILIES", "Generic", "Group", "HFSwin", "HFSwinV2", "Member",
           "TimmSwin", "TimmSwinV2", "find_adapter", "natural_key"]
