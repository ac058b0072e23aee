"""Drop-in modules for pruned timm Swins and ``convert``, which swaps them in.

CPU: timm's torch code, except float32 inference of Swin v1, which runs cpu_inference.py's path
(timm's logits to float rounding, a few images at a time). CUDA (or backend "triton"): the
block-sparse linear (forward only: training runs F.linear) and the fused window attention
(forward and backward) of dimap_fast.kernels.
"""

from timm.layers import register_notrace_module

from .backend import BACKENDS, backend, get_backend, set_backend
from .format_choice import CANDIDATES, ChoiceTable, LayerChoice, format_choices, measure_table
from .convert import choose_block, convert
from .patch_layers import PatchEmbed, PatchMerging
from .sparse_formats import BsrLinear, SemiSparseLinear
from .sparse_linear import SparseLinear, zero_smallest_tiles_
from .swin_block import SwinBlock
from .swinv2 import SwinV2Block, WindowAttentionV2
from .window_attention import WindowAttention
from .derived_linear import DerivedLinear

# timm's fx tools (feature extraction; its fx-then-TorchScript tests) keep each drop-in whole: the
# graph calls the module, which picks its path when the graph runs, and TorchScript compiles the
# module itself (timm's code) where it could not compile the choice between two paths.
for _drop_in in (SwinBlock, SwinV2Block, WindowAttention, WindowAttentionV2, DerivedLinear):
    register_notrace_module(_drop_in)

__all__ = [
    "BACKENDS", "CANDIDATES", "BsrLinear", "ChoiceTable", "LayerChoice", "PatchEmbed", "PatchMerging",
    "SemiSparseLinear",
    "SparseLinear", "SwinBlock", "SwinV2Block", "WindowAttention", "WindowAttentionV2", "backend", "choose_block", "convert",
    "format_choices", "get_backend", "measure_table", "set_backend", "zero_smallest_tiles_",
]
