"""Parameters and FLOPs, dense and pruned, per module and per layer.

Dense FLOPs are torch's own count (``torch.utils.flop_counter``): every matmul, convolution and
attention one forward pass runs, whatever the architecture, halved to the convention of the Swin
paper, timm and fvcore (one multiply-add = one FLOP). Neither counts softmax, norms, activations or
the adds of biases and residuals. The pass runs on the meta device when the model allows it: the
counter reads shapes only, so Swin-B costs a fraction of a second instead of seconds on a CPU.

Our correction, as in the paper: a zeroed prunable weight is removed from the FLOPs of the layer that
holds it. A layer (a module with a weight matrix and no children: Linear, Conv2d, ...) does its dense
FLOPs / its weight count per weight (the positions, tokens or pixels, it sees over all its calls),
so pruned = dense - sum over prunable layers of positions x zeroed weights. Zeros elsewhere (biases
that start at zero, say) are not pruning. A shrunk model's narrower layers and fewer heads simply
count as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count, shape_wrapper

from ..arch import find_adapter
from ..errors import DimapError
from .prunable import prunable_layers


def report(model, input_size=None, module_map=None, example_input=None) -> dict:
    """Sparsity per module and per layer; parameters and FLOPs of the whole model, dense and pruned.

    input_size: an int or (H, W); default the model's own (224 for the ImageNet Swins). A model
    that takes no image passes ``example_input``, a tensor of the input's shape and dtype. Given a
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
        inputs = example_input if example_input is not None else input_shape(model, input_size)
        dense, pruned = count_flops(model, inputs, {layer.name for layer in layers})
        flops = {"dense": dense, "pruned": pruned, "reduction": share_removed(dense, pruned)}
    else:
        params = sum(t.numel() for t in model.values() if t.is_floating_point())
        flops = None
    return {
        "modules": modules,
        "layers": rows,
        "params": {"dense": params, "pruned": params - zeros_total, "reduction": zeros_total / params},
        "flops": flops,
    }


def input_shape(model, input_size):
    """(1, C, H, W): ``input_size`` (an int or (H, W)) or the size the model's adapter reads, else 3 x 224 x 224."""
    return find_adapter(model).input_shape(model, input_size)


@dataclass(frozen=True)
class Workload:
    """What one forward pass runs, whatever the weights hold (multiply-adds)."""

    total: int  # the whole pass
    positions: dict[str, int]  # layer name -> multiply-adds per weight (output positions over all its calls)
    layers: dict[str, int]  # layer name -> multiply-adds its weight does, however it was called
    modules: dict[str, int]  # module name -> multiply-adds over all its calls, its children's included


def workload(model: torch.nn.Module, inputs) -> Workload:
    """One forward pass of ``inputs`` (a shape, or an example tensor) under torch's flop counter.

    It runs on the meta device when the model allows it. Code that needs values (``.item()``, a
    data-dependent shape) cannot run there: then the model runs for real.
    """
    try:
        return count_workload(model, inputs, meta=True)
    except Exception:  # noqa: BLE001 - a failure on meta only means the real pass is needed
        pass
    try:
        return count_workload(model, inputs, meta=False)
    except Exception as exc:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        raise DimapError(f"cannot run the model on an input of shape {shape}: {exc}; pass input_size= "
                         "(or example_input= for a model that takes no image)") from None


def _cpu_flash_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels but not the CPU one SDPA picks for real CPU tensors
_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FORMULAS = {**flop_registry, **({_CPU_SDPA: shape_wrapper(_cpu_flash_attention)} if _CPU_SDPA is not None else {})}


class _Counter(TorchDispatchMode):
    """torch's FLOP formulas (flop_counter's registry), summed.

    FlopCounterMode applies the same formulas but also tracks the module hierarchy, op by op; our
    hooks below do that once per module call instead, which keeps Swin-B's meta pass near its bare cost.
    """

    def __init__(self, weights: dict[int, str], meta: bool = False):
        super().__init__()
        self.total = 0
        self.weights = weights  # storage of each weight matrix -> its parameter name
        self.per_weight: dict[str, int] = {}
        self.meta = meta
        self.shapes: dict = {}  # (op, argument metadata) -> the metadata of its outputs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self._meta_call(func, args, kwargs) if self.meta else func(*args, **kwargs)
        formula = _FORMULAS.get(func._overloadpacket)
        if formula is not None:
            flops = formula(*args, **kwargs, out_val=out)
            self.total += flops
            # credited to the weight the op reads, however it was called: timm's SwinV2 runs its qkv
            # weight through F.linear from the attention's forward, past the qkv module's hooks
            name = next((self.weights[key] for key in map(_storage, args) if key in self.weights), None)
            if name is not None:
                self.per_weight[name] = self.per_weight.get(name, 0) + flops
        return out


    def _meta_call(self, func, args, kwargs):
        # A block repeats its stage's shapes, and a meta op's outputs depend on its arguments'
        # metadata alone: ops that return new tensors are run once per distinct call (their meta
        # kernels are Python decompositions, most of the pass's time), then only allocated.
        if func.is_view or any(r.alias_info is not None for r in func._schema.returns):
            return func(*args, **kwargs)
        try:
            key = (func, _signature(args), _signature(kwargs))
            hash(key)
        except TypeError:
            return func(*args, **kwargs)
        spec = self.shapes.get(key)
        if spec is None:
            out = func(*args, **kwargs)
            leaves, tree = torch.utils._pytree.tree_flatten(out)
            if all(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in leaves):
                self.shapes[key] = (tree, [(t.shape, t.stride(), t.dtype) for t in leaves])
            return out
        tree, metas = spec
        return torch.utils._pytree.tree_unflatten(
            [torch.empty_strided(shape, stride, dtype=dtype, device="meta") for shape, stride, dtype in metas], tree)


def _signature(value):
    """A hashable description of op arguments: tensors by their metadata, the rest as they are."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "meta":
            raise TypeError("a real tensor: its values may matter")  # not cached
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.requires_grad)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *map(_signature, value))
    if isinstance(value, dict):
        return tuple((k, _signature(v)) for k, v in sorted(value.items()))
    return value


def _storage(value) -> int | None:
    """The storage a tensor (or a view of it, such as a transposed weight) reads, as a key."""
    return value.untyped_storage()._cdata if isinstance(value, torch.Tensor) else None


@torch.inference_mode(False)  # inside inference mode the counter's dispatch mode sees no op
@torch.no_grad()
def count_workload(model: torch.nn.Module, inputs, meta: bool) -> Workload:
    """The Workload of one forward pass of ``inputs``, on meta tensors (no arithmetic) or for real."""
    named = list(model.named_modules())
    names = {id(m): n for n, m in named}
    seen: dict[str, int] = {}
    starts: dict[int, list[int]] = {}
    hooks = []

    def before(mod, args):
        starts.setdefault(id(mod), []).append(counter.total)

    def after(mod, args, output):
        name = names[id(mod)]
        seen[name] = seen.get(name, 0) + counter.total - starts[id(mod)].pop()

    for _, mod in named:
        hooks += [mod.register_forward_pre_hook(before), mod.register_forward_hook(after)]
    first = next(model.parameters())
    was_training = model.training
    model.eval()
    state = dict(model.named_parameters())
    if meta:
        state = {k: torch.empty_like(v, device="meta") for k, v in [*state.items(), *model.named_buffers()]}
    matrices = dict(model.named_parameters())
    counter = _Counter({_storage(state[k]): k for k, v in matrices.items() if v.dim() >= 2}, meta)
    try:
        with counter:
            if meta:
                from torch.func import functional_call

                functional_call(model, state, (_example(inputs, torch.device("meta"), first.dtype),))
            else:
                model(_example(inputs, first.device, first.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    macs = {name: flops // 2 for name, flops in seen.items()}  # torch counts a multiply-add as 2
    positions, layers = {}, {}
    for param, flops in counter.per_weight.items():
        module, _, leaf = param.rpartition(".")
        if leaf == "weight":
            layers[module] = flops // 2
            positions[module] = flops // 2 // matrices[param].numel()
    return Workload(counter.total // 2, positions, layers, macs)


def _example(inputs, device, dtype) -> torch.Tensor:
    if isinstance(inputs, torch.Tensor):
        return torch.zeros_like(inputs, device=device) if inputs.is_floating_point() else inputs.to(device)
    return torch.zeros(tuple(inputs), device=device, dtype=dtype)


def count_flops(model: torch.nn.Module, inputs, prunable_names=frozenset()) -> tuple[int, int]:
    """(dense, pruned) multiply-adds of one forward pass of ``inputs`` (a shape or an example tensor)."""
    return tally(model, workload(model, inputs), prunable_names)


def tally(model: torch.nn.Module, work: Workload, prunable_names=frozenset()) -> tuple[int, int]:
    """(dense, pruned) multiply-adds of ``work`` with the model's weights as they are now."""
    modules = dict(model.named_modules())
    costs, removed = [], []
    for name, positions in work.positions.items():
        if name + ".weight" in prunable_names:
            weight = modules[name].weight
            costs.append(positions)
            removed.append(weight.numel() - int(torch.count_nonzero(weight)))
    return work.total, pruned_macs(work.total, costs, removed)


def pruned_macs(dense: int, costs, removed) -> int:
    """The multiply-adds pruning leaves of ``dense``: each removed weight (or unit) takes away its
    cost, the multiply-adds it does per forward pass (its layer's positions, for a weight)."""
    return dense - int(np.dot(np.asarray(costs, dtype=np.int64), np.asarray(removed, dtype=np.int64)))


def share_removed(dense: int, pruned: int) -> float:
    """The share of the dense FLOPs pruning removes (0 for a model that computes nothing)."""
    return 1 - pruned / dense if dense else 0.0


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
