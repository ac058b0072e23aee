"""What every architecture adapter is made of, and the surgery that is the same for all of them.

An adapter holds every fact about one model family: which weights are prunable and in which
DIMAP module (``module_map``), how the weights of a block split into MLP neurons and attention
heads (``groups``), what else has one entry per head (position-bias columns, logit scales) and
which attributes follow the head count (``after_resize``), how to rebuild a model from a recorded config (``build``, ``config_of``) and what
input it takes (``input_size``). Everything else in dimap_fast works on the generic ``Group`` below.

A ``Group`` is one layer of units (the neurons of one MLP, the heads of one attention), given as
members: a tensor name, the axis along which the units lie, and an index [units, per_unit] of
positions on that axis. A timm head is rows of qkv (at the q, k and v offsets), its qkv bias
entries and columns of proj; a neuron is a row of fc1, its bias entry and a column of fc2.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import DimapError


def natural_key(name: str) -> tuple:
    """Sort key that compares the numbers in a name as numbers: layers.2 before layers.10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


@dataclass(frozen=True, eq=False)
class Member:
    """One tensor's share of a group: positions ``index[u]`` along ``axis`` belong to unit u."""

    name: str
    axis: int
    index: torch.Tensor  # [units, per_unit], long
    shape: tuple
    score: bool = True  # counts in the unit's energy (weights and their biases)
    weight: bool = False  # a weight matrix the module map may hold (it gets a mask)
    output: bool = False  # the unit's output weights: all zero means the unit adds nothing

    def axis_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """Bool along ``axis``: positions of kept units, and any position no unit owns."""
        mask = torch.ones(self.shape[self.axis], dtype=torch.bool, device=keep.device)
        index = self.index.to(keep.device)
        mask[index.reshape(-1)] = False
        mask[index[keep].reshape(-1)] = True
        return mask


@dataclass(frozen=True, eq=False)
class Group:
    """One layer of channel units: a block's MLP neurons (kind "hidden") or attention heads ("heads")."""

    name: str  # unit-layer name, e.g. layers.0.blocks.1.mlp
    module: str  # MLP-M or ATTN-M
    kind: str  # "hidden" or "heads": the key in block_sizes
    block: str  # the block's name, e.g. layers.0.blocks.1
    units: int
    members: tuple[Member, ...]
    attrs: dict = field(default_factory=dict, compare=False)  # adapter data for after_resize

    def weight_names(self) -> list[str]:
        return [m.name for m in self.members if m.weight]

    def energy(self, tensors: dict) -> torch.Tensor:
        """float64 [units]: each unit's squared L2 norm over its scored members."""
        per_axis: dict[tuple, list] = {}  # members on the same positions are added before gathering
        for m in self.members:
            if not m.score:
                continue
            t = tensors[m.name].detach().double().square()
            dims = [d for d in range(t.dim()) if d != m.axis]
            vec = t.sum(dim=dims) if dims else t
            key = (id(m.index), vec.numel())
            if key in per_axis:
                per_axis[key][1] = per_axis[key][1] + vec
            else:
                per_axis[key] = [m.index, vec]
        energy = None
        for index, vec in per_axis.values():
            part = vec[index.to(vec.device)].sum(1)
            energy = part if energy is None else energy + part
        return energy.cpu()

    def expand(self, keep: torch.Tensor, names) -> dict[str, torch.Tensor]:
        """Per-weight masks (only the members named in ``names``) from a [units] keep vector."""
        out = {}
        for m in self.members:
            if not m.weight or m.name not in names:
                continue
            view = [1] * len(m.shape)
            view[m.axis] = -1
            out[m.name] = m.axis_mask(keep).view(view).expand(m.shape).contiguous()
        return out

    def alive(self, tensors: dict) -> torch.Tensor:
        """Bool [units]: whose output weights are not all zero (the units shrink keeps)."""
        alive = torch.zeros(self.units, dtype=torch.bool)
        for m in self.members:
            if not m.output:
                continue
            t = tensors[m.name].detach()
            dims = [d for d in range(t.dim()) if d != m.axis]
            nonzero = t.ne(0).any(dim=dims) if dims else t.ne(0)
            alive |= nonzero.cpu()[m.index].any(dim=1)
        return alive


def units_index(units: int, per_unit: int, offsets=(0,)) -> torch.Tensor:
    """[units, len(offsets) * per_unit]: unit u owns offset + u * per_unit + [0, per_unit) for each offset."""
    base = torch.arange(units)[:, None] * per_unit + torch.arange(per_unit)[None, :]
    return torch.cat([base + o for o in offsets], dim=1)


def member(tensors: dict, name: str, axis: int, index: torch.Tensor, **flags) -> Member | None:
    """A Member for ``name`` if the source holds it (biases and extras are optional), else None."""
    t = tensors.get(name)
    if t is None:
        return None
    if t.dim() <= axis or int(index.max()) >= t.shape[axis]:
        raise DimapError(f"{name} has shape {tuple(t.shape)}: it does not split into {index.shape[0]} units of "
                         f"{index.shape[1]} along axis {axis}; is this checkpoint from another architecture?")
    return Member(name, axis, index, tuple(t.shape), **flags)


def neuron_group(block: str, label: str, fc1: str, fc2: str, tensors: dict) -> Group:
    """The hidden neurons of an MLP: row i of fc1 (and its bias entry), column i of fc2."""
    w1, w2 = tensors[f"{fc1}.weight"], tensors[f"{fc2}.weight"]
    if w1.dim() != 2 or w2.dim() != 2 or w1.shape[0] != w2.shape[1]:
        raise DimapError(f"{block}: fc1 {tuple(w1.shape)} and fc2 {tuple(w2.shape)} do not share a hidden width")
    index = units_index(w1.shape[0], 1)
    members = [member(tensors, f"{fc1}.weight", 0, index, weight=True),
               member(tensors, f"{fc2}.weight", 1, index, weight=True, output=True),
               member(tensors, f"{fc1}.bias", 0, index)]
    return Group(f"{block}.{label}", "MLP-M", "hidden", block, w1.shape[0], tuple(m for m in members if m))


def head_group(block: str, label: str, heads: int, members: list, attrs: dict) -> Group:
    return Group(f"{block}.{label}", "ATTN-M", "heads", block, heads, tuple(m for m in members if m), attrs)


class Adapter:
    """One model family. Subclasses set ``name`` and ``module_map`` and override what they support."""

    name = "adapter"
    module_map: dict[str, tuple[str, ...]] = {}

    @classmethod
    def claims_model(cls, model: nn.Module) -> bool:
        return False

    @classmethod
    def claims_names(cls, names: list[str]) -> bool:
        return False

    def module_of(self, name: str) -> str | None:
        hits = [m for m, pats in self.module_map.items() if any(fnmatch.fnmatchcase(name, p) for p in pats)]
        return hits[0] if hits else None

    def groups(self, tensors: dict) -> list[Group]:
        """Neuron and head groups of every block, blocks in natural order, neurons before heads."""
        raise DimapError(self._no_groups("pattern 'channel'"))

    def check_shrink(self, model: nn.Module) -> None:
        """Refuse (DimapError) a model whose attention this family cannot resize."""

    def after_resize(self, model: nn.Module, group: Group, kept: int) -> None:
        """Attributes that follow a group's width (head counts), set after its tensors shrank."""

    # -- building and feeding the family --------------------------------------------------------

    def build(self, config: dict) -> nn.Module:
        """A fresh model of this family from ``config`` (what ``config_of`` recorded), no download."""
        raise DimapError(f"adapter {self.name!r} cannot build a model from a recorded config: "
                         "rebuild the model yourself and load the weights into it")

    def config_of(self, model: nn.Module) -> dict | None:
        """A JSON-able description ``build`` rebuilds the model from, or None when the family has none."""
        return None

    def input_size(self, model: nn.Module) -> tuple[int, int, int] | None:
        """(channels, height, width) of one image ``model`` takes, or None when nothing says.

        Read, in order, from timm's ``patch_embed`` (``set_input_size`` keeps it current), timm's
        ``pretrained_cfg`` and a Hugging Face ``config``; a family may know better and override.
        """
        embed = getattr(model, "patch_embed", None)
        size = getattr(embed, "img_size", None)
        chans = getattr(getattr(embed, "proj", None), "in_channels", None)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if (size is None or chans is None) and cfg.get("input_size"):
            c, *hw = cfg["input_size"]
            size, chans = size or hw, chans or c
        config = getattr(model, "config", None)
        size = size or getattr(config, "image_size", None)
        chans = chans or getattr(config, "num_channels", None)
        if size is None:
            return None
        size = (size, size) if isinstance(size, int) else tuple(size)
        return int(chans or 3), int(size[0]), int(size[1])

    def input_shape(self, model: nn.Module, input_size=None, batch: int = 1) -> tuple[int, int, int, int]:
        """(batch, C, H, W): ``input_size`` (an int or (H, W)) or the model's own, else 3 x 224 x 224."""
        chans, *size = self.input_size(model) or (3, 224, 224)
        if input_size is not None:
            size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        return int(batch), int(chans), int(size[0]), int(size[1])

    def _no_groups(self, what: str) -> str:
        return (f"{what} needs the model's neuron and head groups, which adapter {self.name!r} does not describe "
                "(a module map names weights, not which rows and columns form a neuron or a head): use pattern "
                "'unstructured' or 'block'; channel and shrink know timm Swin v1/v2 and Hugging Face Swin/Swinv2")

    # -- the surgery, the same for every family once its groups are known ---------------------------

    @torch.no_grad()
    def shrink(self, model: nn.Module, align: int = 8) -> nn.Module:
        """Remove, in place, every unit whose output weights are all zero (one head or neuron stays)."""
        groups = self._shrink_groups(model)
        tensors = model_tensors(model)
        for g in groups:
            keep = g.alive(tensors)
            if not keep.any():
                keep[0] = True  # keep shapes valid; its output weights are zero
            if g.kind == "hidden":
                keep = align_keep(keep, align)
            self.resize_group(model, g, keep)
        return model

    def block_sizes(self, model: nn.Module) -> dict[str, dict[str, int]]:
        sizes: dict[str, dict[str, int]] = {}
        for g in self.groups(model_tensors(model)):
            sizes.setdefault(g.block, {})[g.kind] = g.units
        return sizes

    @torch.no_grad()
    def resize(self, model: nn.Module, sizes: dict, where: str = "the file") -> nn.Module:
        """Give a freshly built model the block sizes of a shrunk one (values to be loaded after)."""
        by_block: dict[str, list[Group]] = {}
        for g in self._shrink_groups(model):
            by_block.setdefault(g.block, []).append(g)
        for block, size in sizes.items():
            if block not in by_block:
                raise DimapError(f"{where}: block {block} is not in the rebuilt architecture")
            for g in by_block[block]:
                n = int(size[g.kind])
                if not 1 <= n <= g.units:
                    raise DimapError(f"{where}: block {block} has {n} {g.kind}, the architecture {g.units}")
                self.resize_group(model, g, torch.arange(g.units) < n)
        return model

    def _shrink_groups(self, model: nn.Module) -> list[Group]:
        if not isinstance(model, nn.Module):
            raise DimapError(f"shrink expects a torch.nn.Module, got {type(model).__name__}")
        groups = self.groups(model_tensors(model))
        self.check_shrink(model)
        return groups

    def resize_group(self, model: nn.Module, group: Group, keep: torch.Tensor) -> None:
        for m in group.members:
            owner_name, _, leaf = m.name.rpartition(".")
            owner = model.get_submodule(owner_name)
            old = getattr(owner, leaf)
            kept = torch.nonzero(m.axis_mask(keep)).reshape(-1).to(old.device)
            new = old.detach().index_select(m.axis, kept).clone()
            if isinstance(old, nn.Parameter):
                setattr(owner, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                setattr(owner, leaf, new)  # a registered buffer stays one
            if isinstance(owner, nn.Linear) and leaf == "weight":
                owner.out_features, owner.in_features = new.shape
        self.after_resize(model, group, int(keep.sum()))


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (non-persistent ones too: timm v2's k_bias follows the heads)."""
    return {**dict(model.named_buffers()), **dict(model.named_parameters())}


def align_keep(keep: torch.Tensor, align: int) -> torch.Tensor:
    """Round the kept count up to a multiple of ``align`` with the first removed (zero-output) units.

    Those units add exactly nothing, and matrix widths that are not a multiple of 8 measured up to
    1.5x slower per column on the CPU (oneDNN), which would eat the gain of removing them.
    """
    kept = int(keep.sum())
    short = -kept % align if align > 1 else 0
    if short == 0 or kept + short > keep.numel():
        return keep
    keep = keep.clone()
    keep[torch.nonzero(~keep).reshape(-1)[:short]] = True
    return keep


def block_prefixes(tensors: dict, pattern: re.Pattern) -> dict[str, set[str]]:
    """{block name: relative names of its weights} for weight names that ``pattern`` splits in two."""
    blocks: dict[str, set[str]] = {}
    for name in tensors:
        m = pattern.match(name)
        if m:
            blocks.setdefault(m.group(1), set()).add(m.group(2))
    return dict(sorted(blocks.items(), key=lambda kv: natural_key(kv[0])))


def first_present(tensors: dict, names, axis_of_heads) -> int | None:
    """Head count read from the first per-head tensor present: (name, axis) pairs in order."""
    for name, axis in zip(names, axis_of_heads):
        t = tensors.get(name)
        if t is not None:
            return int(t.shape[axis])
    return None
