"""``convert(model)``: swap a pruned model's attention and MLP layers, in place.

- the model's family (its ``dimap_fast.arch`` adapter) names its drop-ins in drop_ins.py (timm
  Swin v1 and v2 blocks and window attentions, fused attention fast path). Swapping only changes class, so parameters, buffers and the state_dict stay as they
  were. Any other attention module of a family that has drop-ins (swinv2_cr's, say) is left on its
  own code, with a warning naming it; a family without drop-ins (Hugging Face Swin) keeps all of
  its modules and only its Linears are considered;
- every prunable nn.Linear (the module map's QKV-M, PRJ-M, MLP-M weights) runs the fastest of
  dense (kept as nn.Linear), the block-sparse kernel (``SparseLinear``), torch's BSR
  (``BsrLinear``) and 2:4 (``SemiSparseLinear``) for its shape, tile density, dtype and device,
  read from a measured table (format_choice.py: measured once per device and cached on disk). A sparse
  format must beat dense to be chosen, so a converted model is never slower than the dense one.
  The drop-ins share the Linear's Parameters. ``model.dimap_convert_report`` lists what each
  Linear got and the times behind it (``format_choices`` prints it).
  A Linear on the meta device has no values to count zeros in: it stays dense. Build on meta,
  convert, materialize and load the pruned weights, then ``convert`` again to swap the sparse ones.

On CPU, float32 inference of a Swin v1 runs the drop-ins' CPU inference path (cpu_inference.py:
timm's logits to float rounding, 1.4x timm's eager speed on Swin-T); training, autograd and other
dtypes run timm's operations, bit for bit (BSR agrees to float rounding). It also scripts (TorchScript runs the torch path), traces with
torch.fx, compiles, extracts features and resizes (``set_input_size``) as timm's model does; see
backend.py for how each meets the kernels.
"""

from __future__ import annotations

import fnmatch

import warnings

from torch import nn

from ..arch import find_adapter
from ..engine.values import TILE_SIZES
from ..errors import DimapError, check_choice
from ..engine.prunable import check_module_map
from .format_choice import (CHOOSE, ChoiceTable, LayerChoice, LayerKey, agrees, build, candidates_for,
                     fastest, rows_per_call)
from .drop_ins import drop_ins_for
from .sparse_formats import BSR_DTYPES, BsrLinear, SemiSparseLinear, semi_structured_supported
from .sparse_linear import SparseLinear


def choose_block(weight, block=None) -> tuple[int, float]:
    """(block, tile sparsity) for a weight: ``block`` itself, or with None the largest tile side
    that still skips at least 90% of what the best side skips (bigger tiles run faster)."""
    from dimap_fast.kernels import tile_sparsity

    if block is not None:
        if block not in TILE_SIZES:
            raise DimapError(f"block must be one of {TILE_SIZES} or None (choose per layer), got {block!r}")
        return block, tile_sparsity(weight, block)
    found = {b: tile_sparsity(weight, b) for b in TILE_SIZES}
    best = max(found.values())
    side = max(b for b, s in found.items() if s >= 0.9 * best)
    return side, found[side]


def convert(model: nn.Module, block: int | None = None, *, min_sparsity: float = 0.25,
            module_map=None, choose: str = "measured", example_input=None,
            batch_size: int | None = None, table: ChoiceTable | None = None) -> nn.Module:
    """Swap ``model``'s blocks and attentions (those its adapter has drop-ins for) and pruned Linears in place.

    ``block``: tile side 16, 32 or 64 for every layer, or None to pick per layer from its zeros.
    ``min_sparsity``: a Linear with fewer all-zero tiles than this stays dense, unmeasured.
    ``module_map``: which Linear weights may become sparse (default: the map of the model's family).
    ``choose``: "measured" (default) runs each Linear in the fastest format for its work;
    "dense" keeps every nn.Linear; "kernel" (``SparseLinear`` wherever ``min_sparsity`` is met), "bsr" or "2:4" force that format where it applies.
    ``example_input``: a batch like those the model will run, to learn each Linear's rows per
    call (default: one image of the model's input size, times ``batch_size``, default 32).
    ``table``: the ChoiceTable of timings (default: the cache file, see format_choice.py).
    Linears on the meta device stay dense (no zeros to count yet): after ``to_empty`` and loading
    the pruned weights, ``convert`` again swaps in the sparse ones. What each prunable Linear got
    is in ``model.dimap_convert_report`` (``format_choices`` prints it).
    """
    if not isinstance(model, nn.Module):
        raise DimapError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise DimapError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
    if block is not None and block not in TILE_SIZES:
        raise DimapError(f"block must be one of {TILE_SIZES} or None (choose per layer), got {block!r}")
    check_choice("choose", choose, CHOOSE)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise DimapError(f"batch_size must be a positive int, got {batch_size!r}")
    patterns = [p for ps in check_module_map(module_map, model).values() for p in ps]
    swaps = drop_ins_for(find_adapter(model, module_map=module_map).name)
    drop_ins = tuple(swaps.values())
    touched = 0
    left = {}
    for name, module in list(model.named_modules()):
        kind = type(module)
        if kind in drop_ins or kind is SparseLinear:
            touched += 1  # converted before: converting again changes nothing
        elif kind in swaps:
            swaps[kind].adopt(module)
            touched += 1
        elif swaps and "Attention" in kind.__name__ and not _inside_swapped(model, name, drop_ins):
            left.setdefault(f"{kind.__module__}.{kind.__name__}", []).append(name)
    linears, report = [], []
    for name, module in list(model.named_modules()):
        if type(module) in _FORMATS:
            touched += 1
            report.append(_row(name, module, chosen=_FORMATS[type(module)], note="converted before"))
        elif type(module) is nn.Linear and any(fnmatch.fnmatchcase(f"{name}.weight", p)
                                                for p in patterns):
            touched += 1
            linears.append((name, module))
    report += _choose_linears(model, linears, block, min_sparsity, choose, table,
                              example_input, batch_size)
    by_name = dict(linears)
    for row in report:
        if row.chosen != "dense" and row.note != "converted before":
            _set_submodule(model, row.name, build(row.chosen, by_name[row.name], row.block))
    model.dimap_convert_report = report
    if not touched:
        raise DimapError("convert found no block, window attention or prunable Linear it knows: pass a timm "
                         "or Hugging Face Swin (or a module_map naming the model's Linear weights)")
    if left:
        kinds = "; ".join(f"{len(names)} x {kind} (e.g. {names[0]})" for kind, names in left.items())
        warnings.warn(f"convert left these attention modules on their own code: {kinds}. The fused "
                      "kernels cover timm's swin_* and swinv2_* (not swinv2_cr) window attention.",
                      stacklevel=2)
    return model


_FORMATS = {SparseLinear: "kernel", BsrLinear: "bsr", SemiSparseLinear: "2:4"}


def _row(name: str, linear: nn.Linear, **kw) -> LayerChoice:
    w = linear.weight
    return LayerChoice(name, linear.out_features, linear.in_features, None, getattr(linear, "block", None),
                       None, str(w.dtype).replace("torch.", ""), str(w.device), **kw)


def _choose_linears(model, linears, block, min_sparsity, choose, table, example_input,
                    batch_size) -> list[LayerChoice]:
    """One LayerChoice per prunable Linear: what it will run (``chosen``) and why."""
    rows, pending = [], []
    for name, lin in linears:
        row = _row(name, lin)
        rows.append(row)
        if lin.weight.is_meta:
            row.note = "meta: no values yet"
            continue
        if choose == "dense":
            row.note = "asked for dense"
            continue
        row.block, sparsity = choose_block(lin.weight, block)
        row.tile_density = 1.0 - sparsity
        found = candidates_for(lin.weight, sparsity, min_sparsity)
        if choose == "kernel":  # the kernel wherever it skips enough, unmeasured
            ok = sparsity >= min_sparsity and sparsity > 0
            row.chosen, row.note = ("kernel", "asked") if ok else ("dense", "below min_sparsity")
        elif choose != "measured":
            _check_forced(choose, lin, name)
            row.chosen, row.note = (choose, "asked") if choose in found else ("dense", "not applicable")
        elif len(found) == 1:
            row.note = "below min_sparsity" if sparsity < min_sparsity or sparsity == 0 else \
                "no sparse format runs here"
        else:
            pending.append((row, lin, found))
    if not pending:
        return rows
    table = table if table is not None else ChoiceTable()
    seen = rows_per_call(model, [r.name for r, _, _ in pending], example_input, batch_size)
    for row, lin, found in pending:
        if row.name not in seen:
            row.note = "not run by the example input"
            continue
        row.rows = seen[row.name]
        key = LayerKey.for_layer(lin.weight, row.rows, row.block, row.tile_density, found)
        row.times, cached = table.times(key, lin.weight.device)
        row.chosen, row.note = fastest(row.times), "cached" if cached else "measured"
        if row.chosen != "dense" and not agrees(build(row.chosen, lin, row.block), lin):
            warnings.warn(f"convert: {row.chosen} disagrees with F.linear on {row.name}; kept dense",
                          stacklevel=3)
            row.chosen, row.note = "dense", f"{row.chosen} disagreed with F.linear"
    table.save()
    return rows


def _check_forced(choose: str, lin: nn.Linear, name: str) -> None:
    w = lin.weight
    if choose == "2:4" and not semi_structured_supported(w.device):
        raise DimapError(f"choose='2:4' needs a CUDA GPU of compute capability 8.0 or newer; {name} "
                         f"is on {w.device}: use choose='measured'")
    if choose == "bsr" and w.dtype not in BSR_DTYPES.get(w.device.type, ()):
        raise DimapError(f"choose='bsr': torch multiplies BSR on {w.device.type} in "
                         f"{BSR_DTYPES.get(w.device.type, ())} only, {name} is {w.dtype}: "
                         "use choose='measured'")


def _inside_swapped(model: nn.Module, name: str, drop_ins: tuple) -> bool:
    """Whether ``name`` lies inside a module that convert swapped (its parts are covered)."""
    parts = name.split(".")
    return any(type(model.get_submodule(".".join(parts[:i]))) in drop_ins for i in range(1, len(parts)))


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
