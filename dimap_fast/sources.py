"""What a user names on the command line: a timm model name or a checkpoint file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import DimapError
from .io import load_pruned, looks_like_path


@dataclass
class Source:
    spec: str
    state_dict: dict[str, torch.Tensor]
    path: Path | None = None
    model: torch.nn.Module | None = None
    arch: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        return self.path.name.split(".")[0] if self.path else self.spec


def create_timm_model(name: str, pretrained: bool = False, **kwargs) -> torch.nn.Module:
    import timm

    from .errors import check_model_name

    check_model_name(name)
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:
        raise DimapError(f"cannot create {name}: {exc}") from None


def demo_model_from_metadata(metadata: dict[str, str]) -> torch.nn.Module | None:
    config = metadata.get("model_config")
    if not config:
        return None
    from .train import build_swin

    return build_swin(json.loads(config))


def load_source(spec: str, arch: str | None = None, need_model: bool = False, pretrained: bool = False) -> Source:
    """A timm model name (random init unless ``pretrained``) or a checkpoint path."""
    if not isinstance(spec, str) or not spec:
        raise DimapError("name a timm model (e.g. swin_tiny_patch4_window7_224) or a checkpoint file")
    if not looks_like_path(spec):
        model = create_timm_model(spec, pretrained=pretrained)
        return Source(spec, model.state_dict(), model=model, arch=spec)
    path = Path(spec)
    state, masks, metadata = load_pruned(path)
    if metadata.get("format") == "dimap-fast/shrunk-1":
        from .shrink import load_shrunk

        model = load_shrunk(path)
        return Source(spec, state, path=path, model=model, arch=metadata.get("timm_model"), metadata=metadata)
    arch = arch or metadata.get("timm_model")
    src = Source(spec, state, path=path, arch=arch, metadata=metadata, masks=masks)
    if need_model:
        model = create_timm_model(arch) if arch else demo_model_from_metadata(metadata)
        if model is not None:
            load_into(model, state, path)
            src.model = model
    return src


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], path) -> None:
    """Load a state dict strictly; a checkpoint of another architecture gets one clear line."""
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise DimapError(
                f"{path} does not fit this architecture: {key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)}; pass the right --model"
            )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("relative_position_index")]
    if missing or result.unexpected_keys:
        what = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise DimapError(f"{path} does not fit this architecture ({what}): pass the right --model")
