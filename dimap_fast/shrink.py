"""Turn a channel-pruned model into a physically smaller one (saved by io.models.save_shrunk).

A hidden neuron whose output column (fc2's) is all zero adds nothing to the block's output,
whatever its input row and bias hold; a head whose output-projection columns are all zero adds
nothing either. ``shrink`` removes exactly those, so the smaller model gives the masked model's
logits (up to float summation order). Which tensors a neuron or head spans, and what else follows
the head count (position-bias columns, logit scales, attributes), is the family's architecture
adapter's business (``dimap_fast.arch``): timm Swin v1 and v2, Hugging Face Swin and Swinv2.
"""

from __future__ import annotations

from torch import nn

from .arch import find_adapter
from .nn.drop_ins import fit_shrunk


def shrink(model: nn.Module, align: int = 8, arch=None) -> nn.Module:
    """Remove, in place, every neuron and head that a channel pruning zeroed; returns the model.

    A head or neuron counts as removed when its output weights are all zero; at least one head and
    one neuron stay in every block (one with zero output is kept if it is the last). MLP widths are
    rounded up to a multiple of ``align`` with removed neurons (matrix widths off a multiple of 8
    measured up to 1.5x slower per column on the CPU); ``align=1`` keeps only live neurons.
    ``arch``: the adapter name (default: found from the model). Shrunk timm v1 attentions run timm's
    SDPA path (``fused_attn``): the same outputs.
    """
    return fit_shrunk(find_adapter(model, arch).shrink(model, align))


def block_sizes(model: nn.Module, arch=None) -> dict[str, dict[str, int]]:
    """{block name: {"heads": count, "hidden": MLP width}}: what ``resize`` needs to rebuild the shapes."""
    return find_adapter(model, arch).block_sizes(model)


def resize(model: nn.Module, sizes: dict, where: str = "the file", arch=None) -> nn.Module:
    """Give a freshly built model the block sizes of a shrunk one, in place; load its weights after.

    ``where`` names the source of ``sizes`` in errors (a block the model lacks, a size it cannot have).
    """
    return fit_shrunk(find_adapter(model, arch).resize(model, sizes, where))
