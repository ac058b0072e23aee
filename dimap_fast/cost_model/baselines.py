"""The baselines, estimated from first principles: the bytes each aten op moves (a dispatch mode,
over meta tensors, so nothing is computed), and dense GEMMs at a stated share of the tensor peak.

Each op is charged max(its bytes over the copy rate, its matmul FLOPs over the tensor peak), and
nothing for launches or gaps, so a baseline's estimate is a lower bound of its real time. Views
and allocations move nothing. SDPA is charged as one fused kernel (q, k, v and the mask read once,
the output written once), as its memory-efficient kernel does with a mask on a GPU.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .hardware import H100, Gpu

aten = torch.ops.aten
_FREE = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
         aten.detach.default, aten.lift_fresh.default, aten.alias.default}
_PEAK = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "tf32"}


def unique_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor (view) addresses: broadcast dims count once."""
    n = math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0)
    return n * t.element_size()


class _Tally:
    def __init__(self, gpu: Gpu):
        self.gpu = gpu
        self.reset()

    def reset(self) -> None:
        self.bytes, self.seconds, self.count, self.syncs = 0.0, 0.0, 0, 0
        self.sort_bytes = 0.0  # the part of ``bytes`` that sorts moved
        self.sorts: list[tuple[int, int, int]] = []  # each sort's (segments, length, key bytes)

    def add(self, nbytes: float, flops: float = 0.0, dtype=torch.float16) -> None:
        peak = self.gpu.tensor_peak(_PEAK.get(dtype, "tf32"))
        self.bytes += nbytes
        self.seconds += max(self.gpu.memory_seconds(nbytes), flops / peak)
        self.count += 1


def _argument(func, args, kwargs, name, default):
    """An op's argument by its schema's name, passed by position or keyword."""
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            return kwargs.get(name, args[i] if i < len(args) else default)
    return default


class _Bytes(TorchDispatchMode):
    def __init__(self, tally: _Tally):
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is aten._local_scalar_dense.default:
            self.tally.syncs += 1
        if func in _FREE or func.is_view or func is aten._local_scalar_dense.default:
            return out
        # an out= argument is what the op writes: counted once, as its output
        inputs = {k: v for k, v in (kwargs or {}).items() if k != "out"}
        flat = torch.utils._pytree.tree_leaves((args, inputs, out))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        flops = 0.0
        if func.overloadpacket in (aten.bmm, aten.mm, aten.addmm, aten.baddbmm):
            a, b = [t for t in args if isinstance(t, torch.Tensor)][-2:]
            flops = 2.0 * math.prod(a.shape) * b.shape[-1]
        dtype = tensors[0].dtype if tensors else torch.float16
        nbytes = sum(unique_bytes(t) for t in tensors)
        if func.overloadpacket in (aten.sort, aten.argsort):
            self.tally.sort_bytes += nbytes
            key = tensors[0]
            n = key.shape[_argument(func, args, kwargs, "dim", -1)] if key.dim() else 1
            self.tally.sorts.append((key.numel() // max(n, 1), n, key.element_size()))
        self.tally.add(nbytes, flops, dtype)
        return out


class _FreeLinear(torch.autograd.Function):
    """A Linear outside the span being measured: shapes flow, nothing is charged."""

    @staticmethod
    def forward(ctx, x, out_features):
        ctx.in_shape = x.shape
        return x.new_empty(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad):
        return grad.new_empty(ctx.in_shape), None


class _Functions(TorchFunctionMode):
    def __init__(self, tally: _Tally, free_linear: bool):
        super().__init__()
        self.tally, self.free_linear = tally, free_linear

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and self.free_linear:
            return _FreeLinear.apply(args[0], args[1].shape[0])
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            ins = [t for t in (q, k, v, mask) if t is not None]
            out = q.new_empty(*q.shape[:-1], v.shape[-1])
            flops = 4.0 * math.prod(q.shape[:-1]) * k.shape[-2] * q.shape[-1]
            self.tally.add(sum(unique_bytes(t) for t in ins) + unique_bytes(out), flops, q.dtype)
            if q.requires_grad or k.requires_grad or v.requires_grad:
                return _FreeSdpa.apply(q, k, v, self.tally)
            return out
        return func(*args, **kwargs)


class _FreeSdpa(torch.autograd.Function):
    """SDPA's backward charged as FlashAttention-2's: q, k, v, out, dO read, dq, dk, dv written."""

    @staticmethod
    def forward(ctx, q, k, v, tally):
        ctx.tally, ctx.shapes = tally, (q, k, v)
        ctx.save_for_backward(q, k, v)
        return q.new_empty(*q.shape[:-1], v.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        nbytes = 2 * (unique_bytes(q) + unique_bytes(k) + unique_bytes(v)) + 2 * unique_bytes(grad)
        flops = 10.0 * math.prod(q.shape[:-1]) * k.shape[-2] * q.shape[-1]
        ctx.tally.add(nbytes, flops, q.dtype)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), None


@contextlib.contextmanager
def count_bytes(real: bool = False, free_linear: bool = False, gpu: Gpu = H100):
    """Tally the bytes (and lower-bound seconds) of every aten op run inside."""
    tally = _Tally(gpu)
    with _Functions(tally, free_linear), _Bytes(tally):
        yield tally


def timm_attention_span(model: str, dtype: torch.dtype, fused: bool, backward: bool, batch: int,
                        image: int = 224, window: int = 7, gpu: Gpu = H100) -> _Tally:
    """timm's first shifted block, its ``_attn`` from the normed token map with the Linears free:
    roll, partition, reshapes, attention (eager or SDPA), reverse partition, reverse roll."""
    import timm

    from .workloads import TIMM_NAMES

    with torch.device("meta"):
        net = timm.create_model(TIMM_NAMES[model], pretrained=False, img_size=image, window_size=window)
        block = next(m for m in net.modules() if hasattr(m, "_attn") and any(getattr(m, "shift_size", ())))
        block = block.to(dtype)
        block.attn.fused_attn = fused
        side = image // 4
        x = torch.empty(batch, side, side, block.dim, dtype=dtype, requires_grad=backward)
    with count_bytes(free_linear=True, gpu=gpu) as tally:
        out = block._attn(x)
        if backward:  # the gradients themselves, as ours are taken (workloads.Attention)
            wrt = [x] + [p for p in block.attn.parameters() if p.requires_grad]
            torch.autograd.grad(out, wrt, torch.empty_like(out), allow_unused=True)
    return tally


def cublas_seconds(m: int, k: int, n: int, dtype: torch.dtype, gpu: Gpu = H100) -> float:
    """A dense x @ W^T + b through cuBLAS: FLOPs at gpu.cublas_fraction of the peak, or its bytes."""
    es = torch.empty((), dtype=dtype).element_size()
    flops = 2.0 * m * k * n / (gpu.tensor_peak(_PEAK[dtype]) * gpu.cublas_fraction)
    return max(flops, gpu.memory_seconds((m * k + k * n + m * n) * es))
