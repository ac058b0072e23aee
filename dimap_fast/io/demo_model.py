"""The tiny digits Swin: its architecture and the trained checkpoint shipped in ``assets/``."""

from __future__ import annotations

from importlib import resources

from torch import nn

from ..arch.timm_swin import build_swin  # the family's adapter knows how to build it from kwargs
from ..errors import DimapError

DEMO_ASSET = "digits_swin.safetensors"


def small_swin_config(num_classes: int = 10, image_size: int = 32) -> dict:
    """timm SwinTransformer kwargs for a 0.3M-parameter model that trains on 2 CPUs in about a minute.

    Digits are 8x8 images upscaled, so a 4x4 patch at 32x32 is about one original pixel and a
    smaller patch would only add tokens; window 4 on the 8x8 token grid still gives shifted
    windows something to do. Two stages are enough for 10 classes.
    """
    return dict(
        img_size=image_size,
        patch_size=4,
        in_chans=3,
        num_classes=num_classes,
        embed_dim=48,
        depths=(2, 2),
        num_heads=(3, 6),
        window_size=4,
        mlp_ratio=4.0,
        drop_path_rate=0.05,
    )


def small_swin(num_classes: int = 10, image_size: int = 32) -> nn.Module:
    return build_swin(small_swin_config(num_classes, image_size))


def load_demo_model() -> tuple[nn.Module, dict]:
    """The tiny digits Swin shipped with the package, in eval mode, and its metadata.

    ``meta["config"]`` holds the SwinTransformer kwargs and ``meta["data"]`` the digits
    settings it was trained with; ``meta["val_accuracy"]`` is a float.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    asset = resources.files("dimap_fast") / "assets" / DEMO_ASSET
    with resources.as_file(asset) as path:
        if not path.is_file():
            raise DimapError(f"{path} is missing: run scripts/make_demo_model.py to create it")
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        state = load_file(str(path))
    meta = {key: _decode(value) for key, value in raw.items()}
    model = build_swin(meta["config"])
    model.load_state_dict(state)
    return model.eval(), meta


def _decode(value: str):
    import json

    try:
        return json.loads(value)
    except ValueError:
        return value
