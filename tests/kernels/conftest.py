"""Kernel tests run under Triton's CPU interpreter when no GPU is present."""

import os

import torch

# Must happen before anything imports triton: @triton.jit picks the interpreter at decoration.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402



def _ensure_kernels_importable() -> None:
    # Before `pip install -e .` maps kernels/ to dimap_fast.kernels, load it under that name.
    try:
        import dimap_fast.kernels  # noqa: F401
        return
    except ModuleNotFoundError as e:
        if e.name not in ("dimap_fast", "dimap_fast.kernels"):
            raise
    root = Path(__file__).resolve().parents[2]
    import dimap_fast

    spec = importlib.util.spec_from_file_location(
        "dimap_fast.kernels", root / "kernels" / "__init__.py",
        submodule_search_locations=[str(root / "kernels")],
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dimap_fast.kernels"] = mod
    spec.loader.exec_module(mod)
    dimap_fast.kernels = mod


_ensure_kernels_importable()
