"""Parameters and FLOPs, dense and pruned, per module and per layer.

As in the paper, a zeroed prunable weight counts as removed, both from the parameters and from
the FLOPs of the layer that holds it. FLOPs follow Swin's convention (one multiply-add = one FLOP)
and are measured by running one image through the model with hooks: every Linear and Conv2d, plus
the two attention matmuls of each window-attention layer (never pruned, so the same in both
columns). Zeros elsewhere (biases that start at zero, say) are not counted as pruning.
"""

from __future__ import annotations

import json

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


@torch.no_grad()
def count_flops(model: torch.nn.Module, shape, prunable_names=frozenset()) -> tuple[int, int]:
    """(dense, pruned) multiply-adds of one forward pass of an input of ``shape``."""
    names = {id(m): n for n, m in model.named_modules()}
    totals = [0, 0]
    hooks = []

    def linear_hook(mod, inputs, output):
        tokens = output.numel() // mod.out_features
        _add(totals, tokens, mod.weight, names[id(mod)] + ".weight" in prunable_names)

    def conv_hook(mod, inputs, output):
        positions = output.numel() // mod.out_channels
        _add(totals, positions, mod.weight, names[id(mod)] + ".weight" in prunable_names)

    def attention_hook(mod, inputs, output):
        x = inputs[0]  # (windows * batch, tokens, channels)
        macs = 2 * x.shape[0] * x.shape[1] * x.shape[1] * x.shape[2]
        totals[0] += macs
        totals[1] += macs

    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(linear_hook))
        elif isinstance(mod, torch.nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv_hook))
        elif type(mod).__name__ in ("WindowAttention", "WindowMultiHeadAttention"):
            hooks.append(mod.register_forward_hook(attention_hook))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(shape, device=device, dtype=dtype))
    except Exception as exc:
        raise DimapError(f"cannot run the model on an input of shape {tuple(shape)}: {exc}; pass input_size=") from None
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return totals[0], totals[1]


def _add(totals, positions, weight, prunable):
    per_out = weight.numel()
    totals[0] += positions * per_out
    totals[1] += positions * (int(torch.count_nonzero(weight)) if prunable else per_out)


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
