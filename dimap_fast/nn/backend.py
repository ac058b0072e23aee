"""Which code runs a dimap_fast.nn forward: timm-identical torch, or the Triton kernels.

``"auto"`` (default): the Triton kernels for CUDA tensors, torch otherwise; a kernel without a
backward (the block-sparse linear) also gives way to torch while gradients are recorded, and a
shape a kernel does not take (a head dim over its limit) runs torch; on the CPU, float32 inference
of the Swin v1 drop-ins takes cpu_inference.py's path. ``"torch"``: always timm's torch code.
``"triton"``: always the kernels, also on CPU tensors when TRITON_INTERPRET=1 was set before
triton was imported (how the tests run the GPU code path without a GPU); a shape the kernel does
not take, or gradients through a forward-only kernel, is then an error.

WindowAttention, SwinBlock and SparseLinear reach their kernels through ``dispatch``, which
decides on each call, so that a converted model keeps working where timm's does:

- torch.fx: ``dispatch`` is a leaf (each module file declares ``torch.fx.wrap("dispatch")``): a
  traced graph holds the call, and the backend, device and grad mode of each run pick the path.
  The call names its module, so trace a model holding the modules, not one module on its own
  (FX cannot hand the root module itself to a leaf);
- torch.compile: dynamo traces the decision (guarding on what it read) and the torch path; the
  Triton path runs eagerly behind a graph break (``torch.compiler.disable``): its launchers are
  eager code (the packed-weight cache keys on ``data_ptr()``, which dynamo's fake tensors lack),
  not custom ops. Registering the kernels as ``torch.library.triton_op`` would let inductor see
  them; until then the graph break keeps compiled models correct and the kernels in use;
- TorchScript cannot launch Triton: under ``torch.jit.is_scripting()`` each module returns its
  torch path before ``dispatch``, so the compiler never reads it.
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


def _recording(x: torch.Tensor, params) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad
                                                               for p in params))


def use_triton(x: torch.Tensor, *params, unsupported: str | None = None,
               differentiable: bool = False) -> bool:
    """True when this forward should run the Triton kernels. ``unsupported``: why the kernel
    cannot take this module's shape, if it cannot ("auto" then runs torch, "triton" refuses).
    ``differentiable``: the kernel has a backward, so recording gradients is no reason to leave."""
    mode = _state["backend"]
    if mode == "torch":
        return False
    if mode == "auto":
        return (x.is_cuda and kernels().HAVE_TRITON and unsupported is None
                and (differentiable or not _recording(x, params)))
    if unsupported is not None:
        raise DimapError(f"dimap_fast.nn backend 'triton': {unsupported}")
    if not differentiable and _recording(x, params):
        raise RuntimeError("dimap_fast.nn backend 'triton' is forward-only: run under "
                           "torch.no_grad() / torch.inference_mode(), or use backend 'auto'")
    return True


def dispatch(module: torch.nn.Module, *args):
    """``module._triton_path(*args)`` when ``module._use_triton(*args)``, else
    ``module._torch_path(*args)``: the one branch between the two code paths of every module."""
    if module._use_triton(*args):
        return _eager(module, *args)
    return module._torch_path(*args)


@torch.compiler.disable  # torch.compile: a graph break around the kernels (see above)
def _eager(module: torch.nn.Module, *args):
    return module._triton_path(*args)


def scriptable_alias(fn, name: str):
    """timm's method ``fn`` as a method called ``name``, for a subclass whose TorchScript path is
    timm's code: TorchScript has no super() and compiles a method under its function's
    ``__name__``, so timm's ``forward`` reached from our ``forward`` must be renamed."""
    alias = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    alias.__kwdefaults__, alias.__annotations__ = fn.__kwdefaults__, dict(fn.__annotations__)
    alias.__qualname__ = f"{fn.__qualname__.rpartition('.')[0]}.{name}"
    return alias


def attention_unsupported(head_dim: int, x: torch.Tensor) -> str | None:
    """Why the fused window attention cannot run heads of ``head_dim`` channels on ``x``, or
    None. Under autocast the qkv Linear hands the kernel the autocast dtype, whatever x's."""
    from dimap_fast.kernels.window_attention_reference import unsupported

    dtype = x.dtype
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    return unsupported(head_dim, dtype)


def kernels():
    """dimap_fast.kernels, imported on first use so that `import dimap_fast` stays light."""
    import dimap_fast.kernels as k

    return k
