"""Any model, given a user module map: unstructured and block pruning only.

A module map says which weights are prunable and in which module, nothing more: not which rows
and columns form a neuron or a head, nor how to resize an attention. So the channel pattern and
shrink are refused here, with a message naming what is missing.
"""

from __future__ import annotations

from ..errors import DimapError
from .base import Adapter


class Generic(Adapter):
    name = "generic"

    def __init__(self, module_map: dict):
        self.module_map = {str(m): (p,) if isinstance(p, str) else tuple(p) for m, p in dict(module_map).items()}

    def groups(self, tensors: dict):
        raise DimapError(self._no_groups("pattern 'channel'"))

    def _shrink_groups(self, model):
        raise DimapError(self._no_groups("shrink"))
