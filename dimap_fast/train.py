"""Train, fine-tune (with pruning masks held fixed) and evaluate small timm Swin models.

Also builds the tiny Swin used by the demo and loads the checkpoint shipped in ``assets/``.
"""

from __future__ import annotations

import contextlib
import json
import math
from importlib import resources
from typing import Mapping

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer

from .errors import DimapError

DEMO_ASSET = "digits_swin.safetensors"


def small_swin_config(num_classes: int = 10, image_size: int = 32) -> dict:
    """SwinTransformer kwargs for a 0.3M-parameter model that trains on 2 CPUs in about a minute.

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


def build_swin(config: Mapping) -> SwinTransformer:
    """A timm SwinTransformer from kwargs, e.g. those stored in a checkpoint's metadata."""
    config = dict(config)
    for key in ("depths", "num_heads"):  # JSON turns tuples into lists; timm indexes either
        if key in config:
            config[key] = tuple(config[key])
    return SwinTransformer(**config)


def small_swin(num_classes: int = 10, image_size: int = 32) -> SwinTransformer:
    return build_swin(small_swin_config(num_classes, image_size))


@contextlib.contextmanager
def flush_denormals():
    """Treat denormal floats as zero inside the block, then restore the caller's setting.

    Swin's shifted-window mask adds -100 before the softmax, and exp(-100) ~ 4e-44 is a denormal:
    on x86 CPUs every op touching those runs 10-20x slower. Flushing them changes nothing a
    float32 model can notice (they are below 1.2e-38) and turns minutes of training into seconds.
    """
    was_on = float(torch.tensor([1e-39]).mul(1.0)) == 0.0  # torch has no getter for the flag
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device="cpu") -> float:
    """Top-1 accuracy in [0, 1]; leaves the model in eval mode."""
    model.eval().to(device)
    correct = total = 0
    with flush_denormals():
        for images, labels in loader:
            logits = model(images.to(device))
            correct += int((logits.argmax(1) == labels.to(device)).sum())
            total += labels.numel()
    if total == 0:
        raise DimapError("evaluate got an empty loader: give it at least one batch")
    return correct / total


def train(
    model: torch.nn.Module,
    train_loader,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_epochs: float = 1.0,
    min_lr: float = 1e-5,
    masks: Mapping[str, torch.Tensor] | None = None,
    label_smoothing: float = 0.0,
    device="cpu",
    seed: int | None = None,
    progress: bool = True,
) -> dict:
    """AdamW with linear warm-up then cosine decay to ``min_lr``, stepped every batch.

    ``masks`` maps parameter names to bool tensors (True = kept): pruned weights are zeroed
    before training and stay exactly zero after every step, so fine-tuning cannot regrow them.
    Returns per-epoch ``loss``, ``train_acc`` and the ``lr`` of the epoch's last step.
    """
    from tqdm.auto import tqdm

    if epochs < 1:
        raise DimapError(f"epochs must be at least 1, got {epochs}")
    if seed is not None:
        torch.manual_seed(seed)  # drives the loader's shuffling and drop-path alike
    model.to(device).train()
    masked = _bind_masks(model, masks, device)
    _apply_masks(masked)
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise DimapError("train got an empty loader: give it at least one batch")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        _warmup_cosine(epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch), min_lr / lr),
    )
    history = {"loss": [], "train_acc": [], "lr": []}
    with flush_denormals():
        for epoch in range(epochs):
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
            loss, acc = _train_epoch(model, bar, optimizer, scheduler, masked, label_smoothing, device)
            history["loss"].append(loss)
            history["train_acc"].append(acc)
            history["lr"].append(optimizer.param_groups[0]["lr"])
    model.eval()
    return history


def _train_epoch(model, bar, optimizer, scheduler, masked, label_smoothing, device) -> tuple[float, float]:
    """One pass over the loader; returns the epoch's mean loss and training accuracy."""
    model.train()
    loss_sum = 0.0
    correct = seen = 0
    for images, labels in bar:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _mask_grads(masked)
        optimizer.step()
        _apply_masks(masked)
        scheduler.step()
        loss_sum += float(loss.detach()) * labels.numel()
        correct += int((logits.argmax(1) == labels).sum())
        seen += labels.numel()
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    return loss_sum / seen, correct / seen


def _warmup_cosine(total_steps: int, warmup_steps: int, floor: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Decaying norms, biases and position-bias tables only hurts (the usual timm/Swin recipe).
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip or any(name.endswith(s) for s in skip):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _bind_masks(model, masks, device) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    from .masks import bind_masks

    return [(p, m) for _, p, m in bind_masks(model, masks or {}, device)]


@torch.no_grad()
def _apply_masks(masked) -> None:
    for p, mask in masked:
        p.mul_(mask)


def _mask_grads(masked) -> None:
    # Pruned weights get no gradient, so AdamW's moments (and any grad-norm logging) describe
    # only kept weights; the re-zeroing after each step is what guarantees exact zeros.
    for p, mask in masked:
        if p.grad is not None:
            p.grad.mul_(mask)


def load_demo_model() -> tuple[SwinTransformer, dict]:
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
    try:
        return json.loads(value)
    except ValueError:
        return value
