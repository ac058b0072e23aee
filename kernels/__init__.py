"""Triton kernels for DIMAP scoring, threshold selection, mask application, block-sparse linear
layers and fused window attention, each with its plain-torch reference.

Importing this package never needs triton or a GPU: without triton the kernels refuse to run
(RuntimeError) while the ``*_reference`` functions keep working.
"""

from . import apply as _apply
from . import importance as _importance
from . import select as _select
from . import sparse_linear as _sparse_linear
from . import window_attention as _window_attention
from ._common import HAVE_TRITON, LaunchConfig
from .apply import apply_cutoffs, apply_cutoffs_reference
from .importance import module_scores, module_scores_reference
from .select import select_keep_counts, select_keep_counts_reference
from .sparse_linear import (
    BlockSparseWeight,
    block_sparse_linear,
    block_sparse_linear_reference,
    pack_block_sparse,
    tile_sparsity,
    unpack_block_sparse,
)
from .window_attention import window_attention, window_attention_reference


def launch_configs() -> list[LaunchConfig]:
    """Every kernel configuration the launchers can start on a GPU (checked by dimap_fast.hopper_fit)."""
    # Modules by alias: the package rebinds window_attention (and friends) to their functions.
    modules = (_importance, _select, _apply, _sparse_linear, _window_attention)
    return [cfg for mod in modules for cfg in mod.launch_configs()]


__all__ = [
    "HAVE_TRITON",
    "LaunchConfig",
    "launch_configs",
    "apply_cutoffs",
    "apply_cutoffs_reference",
    "module_scores",
    "module_scores_reference",
    "select_keep_counts",
    "select_keep_counts_reference",
    "BlockSparseWeight",
    "block_sparse_linear",
    "block_sparse_linear_reference",
    "pack_block_sparse",
    "tile_sparsity",
    "unpack_block_sparse",
    "window_attention",
    "window_attention_reference",
]
