"""Triton kernels for DIMAP scoring, threshold selection, mask application, block-sparse linear
layers and fused window attention, each with its plain-torch reference.

Importing this package never needs triton or a GPU: without triton the kernels refuse to run
(RuntimeError) while the ``*_reference`` functions keep working.

Installed, this folder is ``dimap_fast.kernels`` and never the top-level ``kernels``. From a
checkout's root (on ``sys.path`` under ``python -m``, ``python -c`` and pytest) that name would find
this folder first and hide an installed package of the same name (Hugging Face's ``kernels``, which
transformers imports), so when imported under that name it hands the name over.
"""

if __name__ == "kernels":
    import importlib.util
    import os
    import sys
    from importlib.machinery import PathFinder

    def _installed_spec(name: str):
        """The spec the import system would find for ``name`` if this checkout's root were not on
        sys.path; a namespace portion (a folder without __init__.py, such as tests/kernels/ once
        pytest puts tests/ on sys.path) is not an installed package."""
        here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
        root = os.path.dirname(here)
        elsewhere = [e for e in sys.path if os.path.realpath(e or os.curdir) != root]
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = PathFinder.find_spec(name, elsewhere) if finder is PathFinder else find and find(name, None)
            if spec is not None and spec.origin not in (None, "namespace") and \
                    os.path.realpath(os.path.dirname(spec.origin)) != here:
                return spec
        return None

    _spec = _installed_spec(__name__)
    # The import system returns whatever sys.modules holds once this file finishes.
    if _spec is None:
        # None installed: an empty stand-in, which reads as absent to probes such as transformers'
        # (no __file__, no __version__: a folder shadowing nothing). Raising here instead would
        # break `import transformers` wherever it imports the name to check it.
        import types

        _module = types.ModuleType(__name__, "No package named kernels is installed.")
        _module.__file__, _module.__path__ = None, []
        _module.__spec__ = importlib.machinery.ModuleSpec(__name__, None, is_package=True)

        def _missing(attr: str):
            raise AttributeError(f"no package named 'kernels' is installed, so it has no {attr!r} "
                                 "(this checkout's kernels/ folder is dimap_fast.kernels: import "
                                 "it by that name)")

        _module.__getattr__ = _missing
        sys.modules[__name__] = _module
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _module
        _spec.loader.exec_module(_module)
else:
    from . import apply as _apply
    from . import importance as _importance
    from . import select as _select
    from . import sparse_linear as _sparse_linear
    from . import window_attention as _window_attention
    from ._common import HAVE_TRITON, LaunchConfig
    from .apply import apply_cutoffs, apply_cutoffs_reference
    from .importance import module_scores, module_scores_reference
    from .select import select_keep_counts, select_keep_counts_reference
    from .sparse_linear import (
        BlockSparseWeight,
        block_sparse_linear,
        block_sparse_linear_reference,
        pack_block_sparse,
        tile_sparsity,
        unpack_block_sparse,
    )
    from .window_attention import (FusedWindowAttention, window_attention,
                                   window_attention_reference)


    def launch_configs() -> list[LaunchConfig]:
        """Every kernel configuration the launchers can start on a GPU (checked by dimap_fast.hopper_fit)."""
        # Modules by alias: the package rebinds window_attention (and friends) to their functions.
        modules = (_importance, _select, _apply, _sparse_linear, _window_attention)
        return [cfg for mod in modules for cfg in mod.launch_configs()]


    __all__ = [
        "HAVE_TRITON",
        "LaunchConfig",
        "launch_configs",
        "apply_cutoffs",
        "apply_cutoffs_reference",
        "module_scores",
        "module_scores_reference",
        "select_keep_counts",
        "select_keep_counts_reference",
        "BlockSparseWeight",
        "block_sparse_linear",
        "block_sparse_linear_reference",
        "pack_block_sparse",
        "tile_sparsity",
        "unpack_block_sparse",
        "FusedWindowAttention",
        "window_attention",
        "window_attention_reference",
    ]
