"""Drop-ins for a Swin's patch embedding and patch merging: timm's modules, run a few images at a
time on the CPU (cpu_inference.py), timm's forward everywhere else.

Neither is pruned (channel pruning keeps the residual width), so their time is the same in a
dense and a pruned Swin, and the pruned one feels it most: at Swin-T's batch 32 on a 2-core CPU,
timm's stem takes 60 ms and the first merge 46-61 ms; as a chunked GEMM and in chunks, 17 and 31.
"""

from __future__ import annotations

import torch
from timm import layers as timm_layers
from timm.models import swin_transformer as timm_swin

from . import cpu_inference
from .backend import scriptable_alias


class _Adopting(cpu_inference.OnCpuPath):
    """adopt(): turn the timm module into this class in place (no state added) and return it.
    A subclass names ``timm_class`` (not annotated here: see OnCpuPath)."""

    @classmethod
    def adopt(cls, module):
        if not isinstance(module, cls.timm_class):
            raise ValueError(f"expected timm's {cls.timm_class.__name__}, got {type(module).__name__}")
        module.__class__ = cls
        return module


class PatchEmbed(_Adopting, timm_layers.PatchEmbed):
    """timm's PatchEmbed; float32 CPU inference computes the patchify convolution as a GEMM."""

    timm_class = timm_layers.PatchEmbed
    _timm_forward = scriptable_alias(timm_layers.PatchEmbed.forward, "_timm_forward")
    _cpu_path = cpu_inference.embeds
    _cpu_forward = cpu_inference.embed_forward


class PatchMerging(_Adopting, timm_swin.PatchMerging):
    """timm's Swin PatchMerging; float32 CPU inference runs it a few images at a time."""

    timm_class = timm_swin.PatchMerging
    _timm_forward = scriptable_alias(timm_swin.PatchMerging.forward, "_timm_forward")
    _cpu_path = cpu_inference.eligible
    _cpu_forward = cpu_inference.in_chunks
