"""Checkpoint files: reading them safely, checking they fit a model, writing them atomically.

Loading prefers safetensors (no code can hide in it); ``.pth``/``.pt``/``.bin`` go through
``torch.load(weights_only=True)``, which refuses pickled code. Whatever is wrong with a file
(missing, truncated, corrupt, a pickle that would run code) is one DimapError, never another
exception.

Outputs are written atomically (``dimap_fast.atomic``); the input is never a target.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .. import atomic
from ..atomic import atomic_path, remove_stale_temps
from ..errors import DimapError, short_reason

MASK_PREFIX = "dimap_mask."
PRUNED_FORMAT = "dimap-fast/1"
SHRUNK_FORMAT = "dimap-fast/shrunk-1"  # weights of a shrunk model plus its per-block sizes
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.endswith((".safetensors",) + TORCH_SUFFIXES) or os.path.exists(spec)


def load_state_dict(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a checkpoint; wrappers like {"model": ...} are unwrapped."""
    path = checkpoint_path(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    return _load_torch(path), {}


def checkpoint_path(path) -> Path:
    """``path`` as a Path, once it is a readable file of a known checkpoint type."""
    if not isinstance(path, (str, os.PathLike)):
        raise DimapError(f"a checkpoint is a file path, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise DimapError(f"{path} is a folder, not a checkpoint file: name the .safetensors or .pth inside it")
    if not path.is_file():
        raise DimapError(f"checkpoint {path} not found: check the path")
    if path.suffix != ".safetensors" and path.suffix not in TORCH_SUFFIXES:
        raise DimapError(f"{path}: unknown checkpoint type {path.suffix!r}: use .safetensors, .pth or .pt")
    if not os.access(path, os.R_OK):
        raise DimapError(f"cannot read {path}: permission denied")
    return path


def _check_safetensors_header(path: Path) -> None:
    """The first 8 bytes give the header length: refuse one that overruns the file before parsing."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if size < 8:
        raise DimapError(
            f"cannot read {path}: {size} bytes is too short for a safetensors file: it is truncated; copy or export it again"
        )
    length = int.from_bytes(head, "little")
    if 8 + length > size:
        raise DimapError(
            f"cannot read {path}: not a valid safetensors file (a header of {length} bytes in a file of {size}): "
            "it is truncated or damaged; copy or export it again"
        )


def _load_safetensors(path: Path):
    from safetensors import safe_open

    _check_safetensors_header(path)
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # several types for damaged files, and pyo3 panics are BaseException
        raise DimapError(_damaged(path, exc)) from None
    return tensors, metadata


def _damaged(path, exc) -> str:
    return f"cannot read {path}: not a valid safetensors file ({short_reason(exc)}): it is truncated or damaged; copy or export it again"


def safetensors_header(path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(shape per tensor, metadata) of a safetensors file, reading its header only."""
    from safetensors import safe_open

    path = checkpoint_path(path)
    _check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        raise DimapError(_damaged(path, exc)) from None


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols would break the one-line refusal
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DimapError(_pickle_refusal(path, str(exc))) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        raise DimapError(
            f"cannot read {path}: truncated or not a torch checkpoint ({short_reason(exc)}); copy or export it again"
        ) from None
    for key in ("state_dict", "model", "model_state", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DimapError(f"{path} holds no state dict of tensors: save model.state_dict() instead")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _pickle_refusal(path: Path, text: str) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", text)
    what = f"would call {found.group(1)}" if found else "holds pickled objects beyond plain tensors"
    return (
        f"refused {path}: loading it {what}, and a pickle can run code, so weights_only loading blocks it; "
        "if you trust the file, re-save its state dict with safetensors.torch.save_file and prune that"
    )


def check_fits(own: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]], path) -> None:
    """Refuse tensors (``shapes``) that do not fit a model's own (``own``): one line naming the first misfit.

    The one architecture check: ``models.load_into`` and ``models.check_architecture`` both end here.
    """
    for key, shape in shapes.items():
        if key in own and tuple(own[key]) != tuple(shape):
            raise DimapError(
                f"{path} does not fit this architecture: {key} has shape {tuple(shape)}, "
                f"the model expects {tuple(own[key])}; pass the right --model"
            )
    # timm rebuilds the relative-position index from the window size, so a file need not hold it
    missing = [k for k in own if k not in shapes and not k.endswith("relative_position_index")]
    unexpected = [k for k in shapes if k not in own]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise DimapError(f"{path} does not fit this architecture ({what}): pass the right --model")


def check_output(out, inputs=()) -> Path:
    """Refuse an output that is an input, or whose folder is missing; return it as a Path."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise DimapError(f"output {out} must end in .safetensors")
    if out.is_dir():
        raise DimapError(f"output {out} is a folder: name a file inside it")
    if not out.parent.is_dir():
        raise DimapError(f"output folder {out.parent} does not exist: create it first")
    for src in inputs:
        if src is not None and Path(src).exists() and out.exists() and os.path.samefile(out, src):
            raise DimapError(f"output {out} is the input checkpoint: choose another --out, the input is never overwritten")
    return out


def save_atomic(out, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write tensors as safetensors: a temporary file beside ``out``, fsync, then rename."""
    from safetensors.torch import save

    out = Path(out)
    seen = set()
    clean = {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen or v.untyped_storage().nbytes() != v.numel() * v.element_size():
            v = v.clone()  # safetensors refuses tensors that share or overhang storage
        seen.add(key)
        clean[k] = v
    remove_stale_temps(out.parent, [out.name])
    # Serialized in memory and written by us: safetensors' own file writer makes a temporary file
    # of its own (.tmpXXXXXX) beside the target, which a kill -9 mid-write left there for good.
    data = save(clean, metadata={k: str(v) for k, v in (metadata or {}).items()})
    with atomic_path(out) as tmp:
        atomic.write_file(tmp, data)
        _sort_header(tmp)
    return out


def _sort_header(path) -> None:
    """Rewrite a safetensors header with its keys sorted, in place and at the same length.

    safetensors writes the metadata in hash-map order, which changes from run to run: sorting makes
    the same tensors and metadata the same bytes. The compact JSON of the same content has the same
    length whatever the key order; trailing spaces (allowed by the format) pad it if shorter.
    """
    with open(path, "r+b") as f:
        length = int.from_bytes(f.read(8), "little")
        raw = f.read(length)
        header = json.loads(raw)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= length:
            f.seek(8)
            f.write(text + b" " * (length - len(text)))


def save_pruned(out, state_dict: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """One safetensors file: the weights, pruned (w * mask) as each is written, and the masks beside them."""
    from .safetensors_stream import write_pruned

    meta = {"format": PRUNED_FORMAT}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    out = Path(out)
    remove_stale_temps(out.parent, [out.name])
    with atomic_path(out) as tmp:
        write_pruned(tmp, state_dict, masks, meta, MASK_PREFIX, atomic.write_file)
        _sort_header(tmp)
    return out


def load_pruned(path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """(state_dict, masks, metadata) of a file written by ``save_pruned``."""
    tensors, metadata = load_state_dict(path)
    masks = {k[len(MASK_PREFIX):]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    for name, mask in masks.items():
        weight = state.get(name)
        if mask.dtype != torch.bool or (weight is not None and weight.shape != mask.shape):
            raise DimapError(
                f"{path}: the mask of {name} is {mask.dtype} {tuple(mask.shape)}, not a bool mask of its weight's shape: "
                "the file is damaged; prune again"
            )
    return state, masks, metadata


def is_shrunk(metadata: dict[str, str]) -> bool:
    return metadata.get("format") == SHRUNK_FORMAT
