"""Models in and out: what a user names (a timm name, a checkpoint, the shipped demo) as a model,
and shrunk models saved with what rebuilds them (``save_shrunk``) and rebuilt (``load_shrunk``).

Every command goes through here: ``load_source`` (prune, report, sweep, demo) and ``load_model``
(finetune, eval) share the timm factory, the architecture check and the shrunk-model rebuild.
The tensor files themselves are read and written by ``checkpoint``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..arch import find_adapter
from .checkpoint import (SHRUNK_FORMAT, check_fits, is_shrunk, load_pruned, load_state_dict, looks_like_path,
                         save_atomic)
from ..errors import DimapError, check_model_name


# ----------------------------------------------------------------------------- building


def create_timm_model(name: str, pretrained: bool = False, **kwargs) -> torch.nn.Module:
    import timm

    check_model_name(name)
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:
        raise DimapError(f"cannot create {name}: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def model_config(metadata: dict[str, str]) -> dict | None:
    """The config a checkpoint records for its adapter to build from (``model_config``, or the shipped demo's ``config``)."""
    text = metadata.get("model_config") or metadata.get("config")
    if not text:
        return None
    try:
        config = json.loads(text)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise DimapError("the checkpoint's recorded model config is not a JSON object: the file is damaged; "
                         "pass --model NAME or export it again")
    return config


def build_from_config(config: dict, adapter: str | None = None) -> torch.nn.Module:
    """The model a recorded config describes, built by the adapter it names (timm Swin kwargs without one)."""
    return find_adapter(arch=adapter or "timm-swin").build(config)


def demo_model_from_metadata(metadata: dict[str, str]) -> torch.nn.Module | None:
    """The model a checkpoint's recorded config describes (the demo's kind), or None if it has none."""
    config = model_config(metadata)
    if config is None:
        return None
    return build_from_config(config, metadata.get("adapter"))


def build_model(arch: dict) -> torch.nn.Module:
    """A model from its description: {"model_config": config[, "adapter": name]} or {"timm_model", "num_classes"}."""
    if "model_config" in arch:
        return build_from_config(arch["model_config"], arch.get("adapter"))
    kwargs = {"num_classes": arch["num_classes"]} if arch.get("num_classes") is not None else {}
    return create_timm_model(arch["timm_model"], pretrained=bool(arch.get("pretrained")), **kwargs)


def model_image_size(model: torch.nn.Module) -> int:
    """The side of the square images ``model`` takes (its adapter reads it; 224 when nothing says)."""
    size = find_adapter(model).input_size(model)
    return size[1] if size else 224


def head_classes(state: dict) -> int | None:
    """The class count of a state dict's classifier, if it has one timm names the usual way."""
    for key in ("head.fc.weight", "head.weight"):
        if key in state and state[key].ndim == 2:
            return int(state[key].shape[0])
    return None


def decode_meta(value: str):
    """A metadata value as written (JSON where it parses, else the string itself)."""
    try:
        return json.loads(value)
    except ValueError:
        return value


# ----------------------------------------------------------------------------- architecture check


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], path) -> None:
    """Load a state dict strictly; a checkpoint of another architecture gets one clear line."""
    check_fits({k: tuple(v.shape) for k, v in model.state_dict().items()},
               {k: tuple(v.shape) for k, v in state.items()}, path)
    model.load_state_dict(state, strict=False)


def check_architecture(shapes: dict[str, tuple[int, ...]], arch: str, path) -> None:
    """Refuse a checkpoint that does not fit timm's ``arch``, before any weight is read.

    The model is built on the meta device, so no weight is allocated or initialised.
    """
    with torch.device("meta"):
        model = create_timm_model(arch)
    check_fits({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes, path)


# ----------------------------------------------------------------------------- shrunk models


def save_shrunk(model: torch.nn.Module, path, arch: str | None = None, config: dict | None = None) -> Path:
    """Weights plus the per-block sizes and the base architecture, so ``load_shrunk`` needs nothing else.

    ``arch`` is a timm name; ``config`` what the model's adapter builds it from (a timm Swin's kwargs,
    the demo's). Without either: timm's ``pretrained_cfg`` name, else the adapter's own record of the
    model (a Hugging Face Swin's class and config). The adapter's name goes in with a config.
    """
    from ..shrink import block_sizes

    adapter = find_adapter(model)
    if arch is None and config is None:
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        if not arch:
            config = adapter.config_of(model)
    if not arch and config is None:
        raise DimapError("save_shrunk needs the base architecture: pass arch='swin_tiny_patch4_window7_224' or config=")
    meta = {"format": SHRUNK_FORMAT, "block_sizes": json.dumps(block_sizes(model))}
    if arch:
        meta["timm_model"] = arch
    if config is not None:
        meta["model_config"] = json.dumps(config)
        meta["adapter"] = adapter.name
    return save_atomic(path, model.state_dict(), meta)


def read_shrunk(path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, int]], dict[str, str]]:
    """(weights, per-block sizes, metadata) of a file written by ``save_shrunk``."""
    state, meta = load_state_dict(path)
    if not is_shrunk(meta):
        raise DimapError(f"{path} is not a shrunk model written by dimap-fast (no block sizes in it)")
    try:
        sizes = json.loads(meta["block_sizes"])
        sizes = {str(k): {"heads": int(v["heads"]), "hidden": int(v["hidden"])} for k, v in sizes.items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DimapError(f"{path}: its block sizes are unreadable: the file is damaged; shrink the model again") from None
    return state, sizes, meta


def load_shrunk(path) -> torch.nn.Module:
    """Rebuild a model written by ``save_shrunk`` from the file alone, in eval mode.

    The base model comes from the timm name the file records, or from the config it records, built
    by the adapter it names (timm Swin kwargs, a Hugging Face config and class): nothing is downloaded.
    """
    from ..shrink import resize

    state, sizes, meta = read_shrunk(path)
    if meta.get("timm_model"):
        model = create_timm_model(meta["timm_model"])
    else:
        try:
            model = demo_model_from_metadata(meta)
        except DimapError as exc:
            raise DimapError(f"{path}: {exc}") from None
    if model is None:
        raise DimapError(f"{path} names no architecture to rebuild")
    resize(model, sizes, where=str(path))
    load_into(model, state, path)
    return model.eval()


# ----------------------------------------------------------------------------- prune, report, sweep, demo


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


def load_source(spec: str, arch: str | None = None, need_model: bool = False, pretrained: bool = False) -> Source:
    """A timm model name (random init unless ``pretrained``) or a checkpoint path."""
    if not isinstance(spec, str) or not spec:
        raise DimapError("name a timm model (e.g. swin_tiny_patch4_window7_224) or a checkpoint file")
    if not looks_like_path(spec):
        model = create_timm_model(spec, pretrained=pretrained)
        return Source(spec, model.state_dict(), model=model, arch=spec)
    path = Path(spec)
    state, masks, metadata = load_pruned(path)
    if is_shrunk(metadata):
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


# ----------------------------------------------------------------------------- finetune, eval


@dataclass
class Loaded:
    model: torch.nn.Module
    masks: dict[str, torch.Tensor]
    arch: dict  # for build_model
    prune: dict  # method / ratio / pattern / block_size the masks came from, as far as known
    source: str


def load_model(spec: str | None, data: str | None, arch_name: str | None = None, pretrained: bool = False) -> Loaded:
    """The model a command names: the shipped demo (no spec, digits), a checkpoint or a timm name."""
    if spec is None:
        if data != "digits":
            raise DimapError("name the model: a checkpoint (.safetensors, .pth) or a timm name such as "
                             "swin_tiny_patch4_window7_224 (only --data digits has a default model)")
        from .demo_model import load_demo_model

        model, meta = load_demo_model()
        return Loaded(model, {}, {"model_config": meta["config"]}, {}, "demo")
    if not looks_like_path(spec):
        if arch_name:
            raise DimapError(f"--model names the architecture of a checkpoint; {spec!r} is a timm name already")
        model = create_timm_model(spec, pretrained=pretrained)
        return Loaded(model, {}, {"timm_model": spec, "num_classes": getattr(model, "num_classes", None),
                                  "pretrained": pretrained}, {}, spec)
    state, masks, meta = load_pruned(spec)
    if is_shrunk(meta):
        raise DimapError(f"{spec} is a shrunk model: fine-tune the masked checkpoint (prune without --shrink), "
                         "then shrink the result")
    config = model_config(meta)
    if arch_name:
        arch = {"timm_model": arch_name, "num_classes": head_classes(state)}
    elif config:
        arch = {"model_config": config, **({"adapter": meta["adapter"]} if meta.get("adapter") else {})}
    elif meta.get("timm_model"):
        arch = {"timm_model": meta["timm_model"], "num_classes": head_classes(state)}
    else:
        raise DimapError(f"{spec} does not record its architecture: pass --model NAME (e.g. swin_tiny_patch4_window7_224)")
    model = build_model(arch)
    load_into(model, state, spec)
    prune = {k: decode_meta(meta[k]) for k in ("method", "ratio", "pattern", "block_size") if meta.get(k)}
    return Loaded(model, masks, arch, prune, str(spec))


def fit_head(loaded: Loaded, num_classes: int, reset_head: bool) -> None:
    """Give the model ``num_classes`` outputs: a timm name gets a new head, a checkpoint must ask."""
    model = loaded.model
    have = getattr(model, "num_classes", None)
    if have == num_classes:
        return
    fresh = "timm_model" in loaded.arch and not looks_like_path(loaded.source)
    if not (fresh or reset_head):
        raise DimapError(f"{loaded.source} classifies {have} classes, the data has {num_classes}: "
                         "fine-tune it with --reset-head to give it a new classifier")
    model.reset_classifier(num_classes)
    if "model_config" in loaded.arch:
        loaded.arch = {**loaded.arch, "model_config": {**loaded.arch["model_config"], "num_classes": num_classes}}
    else:
        loaded.arch = {**loaded.arch, "num_classes": num_classes}


def prune_model(loaded: Loaded, ratio: float, method: str = "dimap", pattern: str = "unstructured",
                block_size: int | None = None) -> None:
    """Prune ``loaded.model`` in place (the masks go into ``loaded.masks``)."""
    from ..engine.plan import plan

    if loaded.masks:
        raise DimapError(f"{loaded.source} is pruned already (it holds masks): drop --ratio, or start from the dense model")
    loaded.masks = plan(loaded.model, method=method, pattern=pattern, block_size=block_size).prune_(ratio)
    loaded.prune = {"method": method, "ratio": ratio, "pattern": pattern, "block_size": block_size}
