"""masks() on CUDA, estimated from its own launch sequence: ``compute_masks`` (plan + masks at one
ratio) runs the Triton plan under the interpreter on a random-init Swin with the real model's
layers at a reduced width, and every Triton launch, torch op and device-to-host read it makes is
counted. Launch and read counts do not depend on the width; bytes scale with the weights, so they
are scaled up to the real model's prunable weights. torch.sort is charged 4 passes over its input
and output (a radix sort of 32-bit keys, 8 bits a pass), every other op its bytes once.

Estimate = launches x launch cost + reads x sync cost + bytes / copy rate (hardware.py); the floor
is one read of the prunable weights (fp32).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

MODELS = {"swin_t": "swin_tiny_patch4_window7_224", "swin_b": "swin_base_patch4_window7_224"}
_WIDTH = {"swin_t": 6, "swin_b": 8}  # embed dim of the stand-in: heads still divide it
_REAL_WIDTH = {"swin_t": 96, "swin_b": 128}
_SORT_PASSES = 4


@dataclass
class MasksRun:
    model: str
    launches: int  # Triton kernels
    torch_ops: int  # each a kernel on a GPU
    syncs: int
    bytes: float  # at the real model's size
    weights: int  # prunable weights of the real model


def _prunable(model) -> int:
    from ..engine.prunable import prunable_layers

    return sum(layer.numel for layer in prunable_layers(model))


@contextlib.contextmanager
def _host_reads(counter: list):
    # A CUDA tensor reaches the host through .cpu() or .tolist() (float() and .item() are
    # _local_scalar_dense, counted by the dispatch mode); .numpy() follows a .cpu().
    saved = {name: getattr(torch.Tensor, name) for name in ("cpu", "tolist")}

    def wrap(name):
        def f(self, *a, **k):
            counter[0] += 1
            return saved[name](self, *a, **k)
        return f

    torch.Tensor.cpu = wrap("cpu")
    torch.Tensor.tolist = wrap("tolist")
    try:
        yield
    finally:
        for name, f in saved.items():
            setattr(torch.Tensor, name, f)


def run(model: str, ratio: float = 0.5) -> MasksRun:
    """Inside the interpreter worker: one compute_masks on the stand-in, counted."""
    import timm
    from triton.runtime import interpreter

    from ..engine.plan import compute_masks
    from .baselines import count_bytes

    torch.manual_seed(0)
    small = timm.create_model(MODELS[model], pretrained=False, embed_dim=_WIDTH[model])
    # Every prunable weight is a Linear's, dim x (1 to 4) x dim: it grows with the width squared.
    scale = (_REAL_WIDTH[model] / _WIDTH[model]) ** 2
    real = round(_prunable(small) * scale)
    launched = [0, 0.0]
    original = interpreter.InterpretedFunction.run

    def counted(self, *args, **kwargs):
        if not kwargs.get("warmup"):
            launched[0] += 1
            launched[1] += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        return original(self, *args, **kwargs)

    reads = [0]
    interpreter.InterpretedFunction.run = counted
    try:
        with _host_reads(reads), count_bytes(real=True) as ops:
            compute_masks(small, ratio, backend="triton")
    finally:
        interpreter.InterpretedFunction.run = original
    nbytes = (ops.bytes + ops.sort_bytes * (_SORT_PASSES - 1) + launched[1]) * scale
    return MasksRun(model, launched[0], ops.count, ops.syncs + reads[0], nbytes, real)


def seconds(r: MasksRun, gpu) -> float:
    return (r.launches + r.torch_ops) * gpu.launch_s + r.syncs * gpu.sync_s + gpu.memory_seconds(r.bytes)


def floor_seconds(r: MasksRun, gpu) -> float:
    return gpu.memory_seconds(4 * r.weights)
