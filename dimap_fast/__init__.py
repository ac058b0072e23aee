"""dimap-fast: DIMAP pruning (He & Zhou, ICLR 2024) for timm's Swin family."""

from .errors import DimapError
from .modules import SWIN_MODULES
from .plan import Cutoff, Plan, compute_masks, plan

__all__ = ["DimapError", "SWIN_MODULES", "Cutoff", "Plan", "compute_masks", "plan"]
__version__ = "0.1.0"
