"""Drop-in modules for pruned timm Swins and ``convert``, which swaps them in.

CPU: timm's torch code, except float32 inference of Swin v1, which runs cpu_inference.py's path
(timm's logits to float rounding, a few images at a time). CUDA (or backend "triton"): the
block-sparse linear (forward only: training runs F.linear) and the fused window attention
(forward and backward) of dimap_fast.kernels.
"""

from .backend import BACKENDS, backend, get_backend, set_backend
from .choice import CANDIDATES, ChoiceTable, LayerChoice, format_choices, measure_table
from .convert import choose_block, convert
from .patch_layers import PatchEmbed, PatchMerging
from .sparse_formats import BsrLinear, SemiSparseLinear
from .sparse_linear import SparseLinear, zero_smallest_tiles_
from .swin_block import SwinBlock
from .window_attention import WindowAttention

__all__ = [
    "BACKENDS", "CANDIDATES", "BsrLinear", "ChoiceTable", "LayerChoice", "PatchEmbed", "PatchMerging",
    "SemiSparseLinear",
    "SparseLinear", "SwinBlock", "WindowAttention", "backend", "choose_block", "convert",
    "format_choices", "get_backend", "measure_table", "set_backend", "zero_smallest_tiles_",
]
