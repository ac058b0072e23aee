"""Shared plumbing for the Triton kernels: optional triton import, launch checks, block tables."""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the plain-torch references must stay importable without triton
    HAVE_TRITON = False

    class _StubTriton:
        @staticmethod
        def jit(fn=None, **_kwargs):
            # Kernel bodies are never run without triton; only their definitions must not fail.
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

    class _StubLanguage:
        constexpr = object  # only evaluated as a parameter annotation

    triton = _StubTriton()
    tl = _StubLanguage()


def _squeeze_interpreter_scalars() -> None:
    """Let ``range()`` take loaded scalars under the interpreter of older Triton (3.6, the GPU
    machines' image): it turns a scalar into an int with ``int(array)`` on a 1-element 1-D array,
    which current numpy refuses; Triton 3.8 squeezes the array first, as this does."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "squeezes_scalars", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.squeezes_scalars = True
    interpreter._patch_lang_tensor = patched


if HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
    _squeeze_interpreter_scalars()


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                 torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8"}


def pointer(dtype: torch.dtype) -> str:
    """Triton's signature type of a tensor argument of ``dtype``, e.g. "*fp16"."""
    return "*" + _TRITON_TYPES[dtype]


@dataclass(frozen=True)
class LaunchConfig:
    """One compile a launcher can ask for on a GPU, precise enough to compile it ahead of time.

    ``num_stages`` is None where the launch names none, so triton's default applies.
    """

    kernel: object  # the @triton.jit function itself, never an autotuner around it
    name: str
    signature: dict  # every argument -> "*fp16", "i32", ... or "constexpr"
    constexprs: dict
    num_warps: int
    num_stages: int | None = None

    @classmethod
    def of(cls, kernel, name: str, types: dict, constexprs: dict, num_warps: int,
           num_stages: int | None = None) -> "LaunchConfig":
        """Fill the signature in the kernel's argument order; a missing type raises KeyError."""
        args = inspect.signature(getattr(kernel, "fn", kernel)).parameters
        sig = {a: "constexpr" if a in constexprs else types[a] for a in args}
        return cls(kernel, name, sig, dict(constexprs), num_warps, num_stages)


@dataclass(frozen=True)
class Launch:
    """One launch a launcher would make for given shapes, for reading its compiled code without
    a GPU: the compile (``config``), the grid, and every non-constexpr argument's value (a
    number, or for a pointer the (shape, dtype) of the tensor it points to). A launch
    specializes integers equal to 1 and multiples of 16 on these values."""

    config: LaunchConfig
    grid: tuple
    args: dict


def interpreting(kernel) -> bool:
    """True when ``kernel`` was decorated under TRITON_INTERPRET=1 (runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_runnable(kernel, device: torch.device, name: str) -> None:
    """Refuse a launch that cannot run here, before any kernel sees the tensors."""
    if not HAVE_TRITON:
        raise RuntimeError(f"{name}: triton is not installed; use {name}_reference instead")
    if device.type != "cuda" and not interpreting(kernel):
        raise ValueError(
            f"{name}: tensors are on {device}; the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before triton is imported)"
        )


def device_guard(device: torch.device):
    # Triton launches on the *current* CUDA device, not on the tensors' device.
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_1d(t, name: str, dtypes, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {what}, got {t.dtype}")


def check_offsets(offsets, n: int) -> torch.Tensor:
    """Validate layer offsets against a flat length ``n``; return them as a CPU int64 tensor."""
    check_1d(offsets, "offsets", (torch.int64,), "int64")
    if offsets.numel() < 2:
        raise ValueError("offsets must have length L+1 >= 2 (at least one layer)")
    host = offsets.detach().to("cpu")
    if int(host[0]) != 0 or int(host[-1]) != n:
        raise ValueError(
            f"offsets must start at 0 and end at the flat length {n}, "
            f"got {int(host[0])}..{int(host[-1])}"
        )
    if not bool((host[1:] > host[:-1]).all()):
        raise ValueError("offsets must be strictly increasing (every layer non-empty)")
    return host


def default_block(kernel, gpu_block: int, interp_block: int) -> int:
    # The interpreter pays per program *and* per element; small blocks keep tests fast
    # while still splitting layers into several blocks.
    return interp_block if interpreting(kernel) else gpu_block


def check_block(block: int) -> int:
    block = int(block)
    if block < 1 or block & (block - 1):
        raise ValueError(f"block_size must be a positive power of two, got {block}")
    return block


def block_table(offsets_host: torch.Tensor, block: int, device: torch.device):
    """Split every layer into blocks of ``block`` elements that never cross a layer boundary.

    Returns (blk_layer int32 [NB], blk_start int64 [NB], blk_off int64 [L+1]) on ``device``;
    blocks of layer l are blk_off[l]:blk_off[l+1], in rank order.
    """
    sizes = offsets_host[1:] - offsets_host[:-1]
    nblk = (sizes + block - 1) // block
    blk_off = torch.zeros(sizes.numel() + 1, dtype=torch.int64)
    torch.cumsum(nblk, 0, out=blk_off[1:])
    nb = int(blk_off[-1])
    layer = torch.repeat_interleave(torch.arange(sizes.numel(), dtype=torch.int64), nblk)
    start = offsets_host[layer] + (torch.arange(nb, dtype=torch.int64) - blk_off[layer]) * block
    return (
        layer.to(torch.int32).to(device),
        start.to(device),
        blk_off.to(device),
    )
