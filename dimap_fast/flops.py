"""Parameters and FLOPs, dense and pruned, per module and per layer.

As in the paper, a zeroed prunable weight counts as removed, both from the parameters and from
the FLOPs of the layer that holds it. FLOPs follow Swin's convention (one multiply-add = one FLOP)
and are measured by running one image through the model with hooks: every Linear and Conv2d, plus
the two attention matmuls of each window-attention layer, as wide as its q, k and v (never pruned,
so the same in both columns; a shrunk model's fewer heads make them smaller). Zeros elsewhere
(biases that start at zero, say) are not counted as pruning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from .errors import DimapError
from .modules import prunable_layers


def report(model, input_size=None, module_map=None) -> dict:
    """Sparsity per module and per layer; parameters and FLOPs of the whole model, dense and pruned.

    input_size: an int or (H, W); default the model's own (224 for the ImageNet Swins). Given a
    state dict instead of a model, FLOPs are None (there is nothing to run).
    """
    layers = prunable_layers(model, module_map)
    rows, modules = {}, {}
    zeros_total = 0
    for layer in layers:
        zeros = int((layer.tensor == 0).sum())
        zeros_total += zeros
        rows[layer.name] = {"module": layer.module, "weights": layer.numel, "zeros": zeros, "sparsity": zeros / layer.numel}
        m = modules.setdefault(layer.module, {"weights": 0, "zeros": 0})
        m["weights"] += layer.numel
        m["zeros"] += zeros
    for m in modules.values():
        m["sparsity"] = m["zeros"] / m["weights"]
    if isinstance(model, torch.nn.Module):
        params = sum(p.numel() for p in model.parameters())
        dense, pruned = count_flops(model, _input_shape(model, input_size), {layer.name for layer in layers})
        flops = {"dense": dense, "pruned": pruned, "reduction": 1 - pruned / dense if dense else 0.0}
    else:
        params = sum(t.numel() for t in model.values() if t.is_floating_point())
        flops = None
    return {
        "modules": modules,
        "layers": rows,
        "params": {"dense": params, "pruned": params - zeros_total, "reduction": zeros_total / params},
        "flops": flops,
    }


def _input_shape(model, input_size):
    chans = getattr(getattr(model, "patch_embed", None), "proj", None)
    chans = chans.in_channels if isinstance(chans, torch.nn.Conv2d) else 3
    if input_size is None:
        size = getattr(getattr(model, "patch_embed", None), "img_size", None) or (224, 224)
    elif isinstance(input_size, int):
        size = (input_size, input_size)
    else:
        size = tuple(input_size)
    return (1, chans, int(size[0]), int(size[1]))


@dataclass(frozen=True)
class Workload:
    """How much of each layer one forward pass runs, whatever its weights hold."""

    positions: dict[str, int]  # Linear / Conv2d name -> output positions (tokens, pixels) over all its calls
    attention: dict[str, tuple[int, int]]  # window attention name -> (query-key pairs over its calls, q/k/v width)


ATTENTION_CLASSES = ("WindowAttention", "WindowAttentionV2", "WindowMultiHeadAttention")


def workload(model: torch.nn.Module, shape) -> Workload:
    """One forward pass of an input of ``shape`` with hooks.

    It runs on the meta device when the model allows it: shapes are all the hooks read, and the meta
    pass does no arithmetic (Swin-B: a fraction of a second instead of seconds on a CPU). Code that
    needs values (``.item()``, a data-dependent shape) cannot run there: then the model runs for real.
    """
    try:
        return _run(model, shape, meta=True)
    except Exception:  # noqa: BLE001 - a failure on meta only means the real pass is needed
        pass
    try:
        return _run(model, shape, meta=False)
    except Exception as exc:
        raise DimapError(f"cannot run the model on an input of shape {tuple(shape)}: {exc}; pass input_size=") from None


@torch.no_grad()
def _run(model: torch.nn.Module, shape, meta: bool) -> Workload:
    names = {id(m): n for n, m in model.named_modules()}
    positions: dict[str, int] = {}
    attention: dict[str, tuple[int, int]] = {}
    hooks = []

    def linear_hook(mod, inputs, output):
        name = names[id(mod)]
        positions[name] = positions.get(name, 0) + output.numel() // mod.out_features

    def conv_hook(mod, inputs, output):
        name = names[id(mod)]
        positions[name] = positions.get(name, 0) + output.numel() // mod.out_channels

    def attention_hook(mod, inputs, output):
        x = inputs[0]  # (windows * batch, tokens, channels)
        # q, k and v are as wide as qkv makes them: a shrunk model's fewer heads do fewer matmuls
        qkv = getattr(mod, "qkv", None)
        width = qkv.out_features // 3 if isinstance(qkv, torch.nn.Linear) else x.shape[2]
        pairs, _ = attention.get(names[id(mod)], (0, width))
        attention[names[id(mod)]] = (pairs + x.shape[0] * x.shape[1] * x.shape[1], width)

    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(linear_hook))
        elif isinstance(mod, torch.nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv_hook))
        elif type(mod).__name__ in ATTENTION_CLASSES:
            hooks.append(mod.register_forward_hook(attention_hook))
    first = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        if meta:
            from torch.func import functional_call

            state = {k: torch.empty_like(v, device="meta") for k, v in [*model.named_parameters(), *model.named_buffers()]}
            functional_call(model, state, (torch.zeros(shape, device="meta", dtype=first.dtype),))
        else:
            model(torch.zeros(shape, device=first.device, dtype=first.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return Workload(positions, attention)


def count_flops(model: torch.nn.Module, shape, prunable_names=frozenset()) -> tuple[int, int]:
    """(dense, pruned) multiply-adds of one forward pass of an input of ``shape``."""
    return tally(model, workload(model, shape), prunable_names)


def tally(model: torch.nn.Module, work: Workload, prunable_names=frozenset()) -> tuple[int, int]:
    """(dense, pruned) multiply-adds of ``work`` with the model's weights as they are now."""
    modules = dict(model.named_modules())
    dense = pruned = 0
    for name, positions in work.positions.items():
        weight = modules[name].weight
        dense += positions * weight.numel()
        kept = int(torch.count_nonzero(weight)) if name + ".weight" in prunable_names else weight.numel()
        pruned += positions * kept
    for pairs, width in work.attention.values():
        dense += 2 * pairs * width  # q @ k^T and attn @ v, never pruned: in both columns
        pruned += 2 * pairs * width
    return dense, pruned


def format_report(rep: dict, layers: bool = False) -> str:
    """A readable table of a ``report`` result."""
    lines = [f"{'module':<10}{'weights':>14}{'zeros':>14}{'sparsity':>10}"]
    for name, m in rep["modules"].items():
        lines.append(f"{name:<10}{m['weights']:>14,}{m['zeros']:>14,}{m['sparsity']:>10.2%}")
    if layers:
        lines.append("")
        width = max(len(n) for n in rep["layers"]) + 2
        lines.append(f"{'layer':<{width}}{'module':<8}{'weights':>12}{'sparsity':>10}")
        for name, r in rep["layers"].items():
            lines.append(f"{name:<{width}}{r['module']:<8}{r['weights']:>12,}{r['sparsity']:>10.2%}")
    p, f = rep["params"], rep.get("flops")
    lines.append("")
    lines.append(f"params  dense {p['dense']:>14,}   pruned {p['pruned']:>14,}   reduction {p['reduction']:.2%}")
    if f:
        lines.append(f"FLOPs   dense {f['dense']:>14,}   pruned {f['pruned']:>14,}   reduction {f['reduction']:.2%}")
    return "\n".join(lines)


def report_json(rep: dict) -> str:
    return json.dumps(rep, indent=2)
