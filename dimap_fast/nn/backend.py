"""Which code runs a dimap_fast.nn forward: timm-identical torch, or the Triton kernels.

``"auto"`` (default): the Triton kernels for CUDA tensors, torch otherwise; a kernel without a
backward (the block-sparse linear) also gives way to torch while gradients are recorded, and a
shape a kernel does not take (a head dim over its limit) runs torch. ``"torch"``: always torch.
``"triton"``: always the kernels, also on CPU tensors when TRITON_INTERPRET=1 was set before
triton was imported (how the tests run the GPU code path without a GPU); a shape the kernel does
not take, or gradients through a forward-only kernel, is then an error.
"""

from __future__ import annotations

import contextlib

import importlib

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
        return (x.is_cuda and _have_triton() and unsupported is None
                and (differentiable or not _recording(x, params)))
    if unsupported is not None:
        raise DimapError(f"dimap_fast.nn backend 'triton': {unsupported}")
    if not differentiable and _recording(x, params):
        raise RuntimeError("dimap_fast.nn backend 'triton' is forward-only: run under "
                           "torch.no_grad() / torch.inference_mode(), or use backend 'auto'")
    return True


def _have_triton() -> bool:
    from dimap_fast.kernels import HAVE_TRITON

    return HAVE_TRITON


def attention_unsupported(head_dim: int) -> str | None:
    """Why the fused window attention cannot run heads of ``head_dim`` channels, or None."""
    # By module path: the kernels package rebinds the name window_attention to the function.
    return importlib.import_module("dimap_fast.kernels.window_attention").unsupported(head_dim)


def kernels():
    """dimap_fast.kernels, imported on first use so that `import dimap_fast` stays light."""
    import dimap_fast.kernels as k

    return k
