"""Datasets for fine-tuning after pruning: scikit-learn's bundled digits, or an image folder.

The digits set ships inside scikit-learn, so the demo, the tests and the examples run offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .errors import DimapError

# Mean and std of the 8x8 digits scaled to [0, 1] and upscaled bilinearly: fixed, so the train
# and val splits (and any later checkpoint user) see the same normalisation whatever the split.
DIGITS_MEAN = 0.305
DIGITS_STD = 0.324


def digits_datasets(image_size: int = 32, seed: int = 0, val_fraction: float = 0.25):
    """(train, val) TensorDatasets of digits as 3-channel ``image_size`` images, int64 labels.

    The split is stratified and depends only on ``seed``, so every class keeps its share in val.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise DimapError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = ((images - DIGITS_MEAN) / DIGITS_STD).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, val_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=val_fraction,
        random_state=seed,
        stratify=labels.numpy(),
    )
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return (
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[val_idx], labels[val_idx]),
    )


def image_folder_datasets(root, image_size: int = 224):
    """(train, val) torchvision ImageFolders under ``root``/train and ``root``/val, timm transforms.

    Train gets timm's standard augmentation; val gets its resize / centre-crop eval transform.
    """
    from timm.data import create_transform

    root = Path(root)
    _check_image_folder(root)
    train = _image_folder(root / "train", create_transform(image_size, is_training=True))
    val = _image_folder(root / "val", create_transform(image_size, is_training=False))
    if train.class_to_idx != val.class_to_idx:
        raise DimapError(
            f"{root}/train and {root}/val hold different class folders "
            f"({sorted(train.class_to_idx)} vs {sorted(val.class_to_idx)}): give both the same classes"
        )
    return train, val


def _image_folder(folder: Path, transform):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(folder, transform=transform)
    except FileNotFoundError as exc:  # torchvision's word for a class folder with no image in it
        raise DimapError(f"{folder}: {exc} Every class folder needs at least one image.") from None


def _check_image_folder(root: Path) -> None:
    # ImageFolder's own errors name one missing piece at a time; say the whole expected layout.
    layout = "expected ROOT/train/CLASS/IMAGE and ROOT/val/CLASS/IMAGE (e.g. val/cat/001.jpg)"
    if not root.is_dir():
        raise DimapError(f"{root} is not a directory: {layout}")
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise DimapError(f"{folder} is missing: {layout}")
        if not any(p.is_dir() for p in folder.iterdir()):
            raise DimapError(f"{folder} has no class subfolders: {layout}")
