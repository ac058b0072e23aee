"""Which code runs a dimap_fast.nn forward: timm-identical torch, or the Triton kernels.

``"auto"`` (default): the Triton kernels for CUDA tensors, torch otherwise; a kernel without a
backward (the block-sparse linear) also gives way to torch while gradients are recorded, and a
shape a kernel does not take (a head dim over its limit) runs torch; on the CPU, float32 inference
of the Swin v1 drop-ins takes cpu_inference.py's path. ``"torch"``: always timm's torch code.
``"triton"``: always the kernels, also on CPU tensors when TRITON_INTERPRET=1 was set before
triton was imported (how the tests run the GPU code path without a GPU); a shape the kernel does
not take, or gradients through a forward-only kernel, is then an error.

``runs_fast_path(module, x)`` is the one place that decides, on each call, from the backend, the
device, the grad mode and what the kernel takes. Each drop-in's forward calls a function of its own
file that asks it and then runs one path (for the blocks: the qkv Linear, the kernel's autograd
Function, the proj Linear), so that a converted model keeps working where timm's does:

- torch.fx: those functions are leaves (``torch.fx.wrap`` in each file): a traced graph holds the
  call, and each run picks the path. timm's fx tools keep the drop-ins whole instead (registered
  as notrace modules in ``__init__``);
- torch.compile: dynamo traces the decision (guarding on what it read) and the torch code; the
  kernels' autograd Functions and the sparse Linears' fast paths run eagerly behind a graph break
  (``torch.compiler.disable``): the launchers are eager code (the packed-weight cache keys on
  ``data_ptr()``, which dynamo's fake tensors lack), not custom ops;
- TorchScript cannot launch Triton: under ``torch.jit.is_scripting()`` each forward returns its
  torch path first, so the compiler never reads the rest.
"""

from __future__ import annotations

import contextlib
import types

import torch

from ..errors import DimapError

BACKENDS = ("auto", "torch", "triton")
_state = {"backend": "auto"}


def get_backend() -> str:
    return _state["backend"]


def set_backend(name: str) -> None:
    """Choose the code path of every dimap_fast.nn module: "auto", "torch" or "triton"."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    _state["backend"] = name


@contextlib.contextmanager
def backend(name: str):
    """``with dimap_fast.nn.backend("torch"): ...`` sets the backend inside the block only."""
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def recording(x: torch.Tensor, params) -> bool:
    """Whether autograd records this forward (grad mode on and x or a parameter needs gradients)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad
                                                               for p in params))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear computes ``x`` in: autocast's where it is on, else x's own."""
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class TwoPaths:
    """What ``runs_fast_path`` asks of a drop-in (a mixin before the torch class): the subclass
    defines ``_torch_path`` (timm's or nn.Linear's code) and may say why the fast path cannot take
    an input (``_fast_path_refusal``) or must not run now (``_timm_only``). No annotations here:
    TorchScript reads a module's attribute types from timm's class."""

    fast_path_is_triton = True  # False: torch's own sparse product, which runs on any device
    fast_path_trains = False  # True: the fast path has a backward, so recorded gradients may take it

    def _timm_only(self) -> bool:
        return False

    def _fast_path_refusal(self, x: torch.Tensor) -> str | None:
        return None


def runs_fast_path(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` runs its fast path on ``x`` now (else its torch path); under backend
    "triton", a fast path that cannot run is an error instead."""
    mode = _state["backend"]
    if mode == "torch" or module._timm_only():
        return False
    refusal = module._fast_path_refusal(x)
    grads = not module.fast_path_trains and recording(x, module.parameters())
    if mode == "auto" or not module.fast_path_is_triton:
        on_device = not module.fast_path_is_triton or (x.is_cuda and kernels().HAVE_TRITON)
        return refusal is None and not grads and on_device
    if refusal is not None:
        raise DimapError(f"dimap_fast.nn backend 'triton': {refusal}")
    if grads:
        raise RuntimeError("dimap_fast.nn backend 'triton' is forward-only: run under "
                           "torch.no_grad() / torch.inference_mode(), or use backend 'auto'")
    return True


def scriptable_alias(fn, name: str):
    """timm's method ``fn`` as a method called ``name``, for a subclass whose TorchScript path is
    timm's code: TorchScript has no super() and compiles a method under its function's
    ``__name__``, so timm's ``forward`` reached from our ``forward`` must be renamed."""
    alias = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    alias.__kwdefaults__, alias.__annotations__ = fn.__kwdefaults__, dict(fn.__annotations__)
    alias.__qualname__ = f"{fn.__qualname__.rpartition('.')[0]}.{name}"
    return alias


def attention_refusal(head_dim: int, x: torch.Tensor) -> str | None:
    """Why the fused window attention cannot run heads of ``head_dim`` channels on ``x``, or
    None. Under autocast the qkv Linear hands the kernel the autocast dtype, whatever x's."""
    from dimap_fast.kernels.window_attention import unsupported

    return unsupported(head_dim, compute_dtype(x))


def kernels():
    """dimap_fast.kernels, imported on first use so that `import dimap_fast` stays light."""
    import dimap_fast.kernels as k

    return k
