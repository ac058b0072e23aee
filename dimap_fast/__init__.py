"""dimap-fast: DIMAP pruning (He & Zhou, ICLR 2024) for timm's Swin family."""

from .arch import SWIN_MODULES
from .engine.flops import report
from .engine.masks import MaskHandle, Pruning, apply_masks, make_permanent
from .engine.plan import Cutoff, Plan, compute_masks, plan
from .engine.values import FlopsReduction, Method, Pattern
from .errors import DimapError
from .io.models import load_shrunk, save_shrunk
from .nn import convert
from .prune import prune_
from .shrink import shrink

__all__ = [
    "DimapError", "SWIN_MODULES", "Cutoff", "Plan", "MaskHandle",
    "Pattern", "Method", "FlopsReduction", "Pruning", "prune_",
    "apply_masks", "compute_masks", "make_permanent", "plan", "report",
    "shrink", "save_shrunk", "load_shrunk", "convert",
]
__version__ = "0.1.0"
