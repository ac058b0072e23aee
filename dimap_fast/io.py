"""Reading checkpoints safely and writing results atomically.

Loading prefers safetensors (no code can hide in it); ``.pth``/``.pt``/``.bin`` go through
``torch.load(weights_only=True)``, which refuses pickled code. Outputs are written to a temporary
file beside the target and renamed over it, so a crash leaves either the old file or the new one,
never half of one; the input is never a target.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .errors import DimapError

MASK_PREFIX = "dimap_mask."
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.endswith((".safetensors",) + TORCH_SUFFIXES) or os.path.exists(spec)


def load_state_dict(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a checkpoint; wrappers like {"model": ...} are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise DimapError(f"checkpoint {path} not found: check the path")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return _load_torch(path), {}
    raise DimapError(f"{path}: unknown checkpoint type {path.suffix!r}: use .safetensors, .pth or .pt")


def _load_safetensors(path: Path):
    from safetensors import safe_open

    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # safetensors raises several types for damaged files
        raise DimapError(f"cannot read {path}: not a valid safetensors file ({_first_line(exc)}); is it truncated?") from None
    return tensors, metadata


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DimapError(
            f"refused {path}: it holds pickled objects beyond plain tensors ({_first_line(exc)[:120]}); "
            "convert it to .safetensors in a trusted environment"
        ) from None
    except Exception as exc:
        raise DimapError(f"cannot read {path}: truncated or not a torch checkpoint ({_first_line(exc)[:120]})") from None
    for key in ("state_dict", "model", "model_state", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DimapError(f"{path} holds no state dict of tensors: save model.state_dict() instead")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_output(out, inputs=()) -> Path:
    """Refuse an output that is an input, or whose folder is missing; return it as a Path."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise DimapError(f"output {out} must end in .safetensors")
    if not out.parent.is_dir():
        raise DimapError(f"output folder {out.parent} does not exist: create it first")
    for src in inputs:
        if src is not None and Path(src).exists() and out.exists() and os.path.samefile(out, src):
            raise DimapError(f"output {out} is the input checkpoint: choose another --out, the input is never overwritten")
    return out


def public_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_atomic(out, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write tensors as safetensors: a temporary file beside ``out``, fsync, then rename."""
    from safetensors.torch import save_file

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
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(clean, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, public_mode())  # mkstemp makes 0600 files; outputs get the usual umask
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def save_pruned(out, state_dict: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """One safetensors file: the pruned weights (zeros in place) and the masks beside them."""
    tensors = dict(state_dict)
    for name, mask in masks.items():
        tensors[MASK_PREFIX + name] = mask.to(torch.bool)
    meta = {"format": "dimap-fast/1"}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    return save_atomic(out, tensors, meta)


def load_pruned(path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """(state_dict, masks, metadata) of a file written by ``save_pruned``."""
    tensors, metadata = load_state_dict(path)
    masks = {k[len(MASK_PREFIX):]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    return state, masks, metadata
