"""dimap-fast: DIMAP pruning (He & Zhou, ICLR 2024) for timm's Swin family."""

from .engine.values import FlopsReduction, Method, Pattern
from .arch import SWIN_MODULES
from .errors import DimapError
from .engine.flops import report
from .engine.masks import MaskHandle, apply_masks, make_permanent
from .nn import convert
from .engine.plan import Cutoff, Plan, compute_masks, plan
from .prune import Pruning, prune_
from .io.checkpoint import save_shrunk
from .io.loading import load_shrunk
from .shrink import shrink

__all__ = [
    "DimapError", "SWIN_MODULES", "Cutoff", "Plan", "MaskHandle",
    "Pattern", "Method", "FlopsReduction", "Pruning", "prune_",
    "apply_masks", "compute_masks", "make_permanent", "plan", "report",
    "shrink", "save_shrunk", "load_shrunk", "convert",
]
__version__ = "0.1.0"
