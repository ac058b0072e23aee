"""Datasets for training and fine-tuning: scikit-learn's bundled digits, or an image folder.

The digits set ships inside scikit-learn, so the demo, the tests and the examples run offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from ..errors import DimapError

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


@dataclass
class Data:
    """What a run trains on and evaluates on (``val`` may be None: no evaluation)."""

    train: Dataset
    val: Dataset | None
    num_classes: int
    spec: dict = field(default_factory=dict)  # how to build it again (stored in checkpoints)


def load_data(data: str, image_size: int, max_train: int | None = None, max_val: int | None = None,
              split_seed: int = 0) -> Data:
    """``digits`` (scikit-learn's, split by ``split_seed``) or an ImageFolder root with train/ and val/."""
    if not data:
        raise DimapError("--data needs 'digits' or a folder with train/ and val/ class subfolders")
    if data == "digits":
        train, val = digits_datasets(image_size=image_size, seed=split_seed)
        num_classes = 10
        where = "digits"
    else:
        root = Path(data).expanduser().resolve()
        train, val = image_folder_datasets(root, image_size=image_size)
        num_classes = len(train.classes)
        where = str(root)
    spec = {"data": where, "image_size": image_size, "split_seed": split_seed,
            "max_train_samples": max_train, "max_val_samples": max_val}
    return Data(subset(train, max_train), subset(val, max_val), num_classes, spec)


def subset(dataset: Dataset, n: int | None) -> Dataset:
    """A fixed random draw of ``n`` samples (all of them when ``n`` is None or larger)."""
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise DimapError(f"a sample limit must be >= 1, got {n}")
    # a fixed random draw, not the first n: an ImageFolder is sorted by class
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n]
    return Subset(dataset, sorted(order.tolist()))
