"""Datasets, the one training loop (masked or not), evaluation, timm's optimizer and the shipped demo checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from dimap_fast.errors import DimapError
from dimap_fast.train import (
    Data, Recipe, digits_datasets, evaluate, flush_denormals, image_folder_datasets, load_demo_model, make_optimizer,
    small_swin, train,
)


@pytest.fixture(scope="module")
def digits():
    return digits_datasets()


def test_digits_shapes_labels_and_normalisation(digits):
    train_set, val_set = digits
    x_train, y_train = train_set.tensors
    x_val, y_val = val_set.tensors
    assert x_train.shape == (1347, 3, 32, 32) and x_val.shape == (450, 3, 32, 32)
    assert x_train.dtype == torch.float32
    assert y_train.dtype == torch.int64 and y_val.dtype == torch.int64
    assert set(y_val.tolist()) == set(range(10))
    counts = torch.bincount(y_val, minlength=10)
    assert counts.min() >= 40  # stratified: each class keeps about a quarter of its ~180 images
    assert abs(float(x_train.mean())) < 0.1 and abs(float(x_train.std()) - 1.0) < 0.1


def test_digits_split_is_deterministic_per_seed(digits):
    again_train, again_val = digits_datasets()
    assert torch.equal(again_train.tensors[1], digits[0].tensors[1])
    assert torch.equal(again_val.tensors[0], digits[1].tensors[0])
    other_val = digits_datasets(seed=1)[1]
    assert not torch.equal(other_val.tensors[1], digits[1].tensors[1])


def test_digits_image_size_and_bad_fraction():
    train_set, _ = digits_datasets(image_size=16, val_fraction=0.5)
    assert train_set.tensors[0].shape[1:] == (3, 16, 16)
    with pytest.raises(DimapError, match="val_fraction"):
        digits_datasets(val_fraction=1.0)


def test_shipped_model_accuracy(digits):
    model, meta = load_demo_model()
    assert meta["config"]["num_classes"] == 10
    assert meta["val_accuracy"] >= 0.93
    result = evaluate(model, digits[1])
    assert result["count"] == len(digits[1]) == 450
    assert result["top1"] >= 0.9 and result["top5"] >= result["top1"]
    assert result["top1"] == pytest.approx(meta["val_accuracy"], abs=1e-3)
    with pytest.raises(DimapError, match="takes a Dataset"):
        evaluate(model, DataLoader(digits[1], batch_size=256))


def _random_masks(model, keep=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(p.shape, generator=gen) < keep
        for name, p in model.named_parameters()
        if name.endswith(("attn.qkv.weight", "mlp.fc1.weight"))
    }


def _tiny(digits, n=64) -> Data:
    return Data(Subset(digits[0], range(n)), None, 10)


TINY = Recipe(epochs=1, lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=0, weight_decay=0.05, batch_size=32,
              label_smoothing=0.0)


def test_masked_training_keeps_pruned_weights_zero(digits):
    torch.manual_seed(0)
    model = small_swin()
    masks = _random_masks(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = train(model, _tiny(digits), TINY, masks, seed=0, progress=False, log=None)
    (entry,) = result["history"]
    assert 0.0 <= entry["train_top1"] <= 1.0 and entry["val"] is None  # no val set: no evaluation
    assert entry["lr"] == pytest.approx(1e-5)  # the cosine ends at min_lr
    assert result["removed"] == pytest.approx(0.5, abs=0.02)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        weight = params[name].detach()
        assert torch.all(weight[~mask] == 0), name
        assert not torch.equal(weight[mask], before[name][mask]), name
    assert not torch.equal(params["head.fc.weight"], before["head.fc.weight"])


def test_training_is_deterministic_given_a_seed(digits):
    def run():
        torch.manual_seed(0)
        model = small_swin()
        train(model, _tiny(digits), TINY, seed=0, progress=False, log=None)
        return model.state_dict()

    first, second = run(), run()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_train_refuses_masks_that_do_not_fit(digits):
    model = small_swin()
    with pytest.raises(DimapError, match="names no parameter"):
        train(model, _tiny(digits), TINY, {"nope.weight": torch.ones(2, dtype=torch.bool)}, progress=False, log=None)
    name = "layers.0.blocks.0.attn.qkv.weight"
    with pytest.raises(DimapError, match="shape"):
        train(model, _tiny(digits), TINY, {name: torch.ones(3, 3, dtype=torch.bool)}, progress=False, log=None)


def test_optimizer_decays_only_matrices_and_not_position_tables():
    model = small_swin()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = make_optimizer(model, TINY).param_groups
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | plain == set(names.values()) and not decayed & plain
    assert all(g["weight_decay"] == TINY.weight_decay for g in groups if g["weight_decay"] > 0)
    assert "layers.0.blocks.0.attn.qkv.weight" in decayed and "head.fc.weight" in decayed
    assert "layers.0.blocks.0.attn.relative_position_bias_table" in plain  # 2-D, named by no_weight_decay()
    assert "layers.0.blocks.0.norm1.weight" in plain and "layers.0.blocks.0.attn.qkv.bias" in plain
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)


def test_flush_denormals_restores_the_callers_setting():
    def flushing():
        return float(torch.tensor([1e-39]).mul(1.0)) == 0.0

    assert not flushing()
    with flush_denormals():
        assert flushing()
    assert not flushing()


def _write_image_folder(root, splits=("train", "val"), classes=("cat", "dog"), per_class=2):
    from PIL import Image

    for split in splits:
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                Image.new("RGB", (40, 30), color=(60 * index, 20 * k, 100)).save(folder / f"{k}.png")


def test_image_folder_datasets(tmp_path):
    _write_image_folder(tmp_path)
    train_set, val_set = image_folder_datasets(tmp_path, image_size=32)
    assert len(train_set) == 4 and len(val_set) == 4
    assert train_set.classes == ["cat", "dog"] == val_set.classes
    image, label = val_set[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 1
    assert train_set[0][0].shape == (3, 32, 32)


def test_image_folder_bad_layouts(tmp_path):
    with pytest.raises(DimapError, match="not a directory"):
        image_folder_datasets(tmp_path / "missing")
    _write_image_folder(tmp_path / "no_val", splits=("train",))
    with pytest.raises(DimapError, match=r"val is missing: expected ROOT/train/CLASS/IMAGE"):
        image_folder_datasets(tmp_path / "no_val")
    flat = tmp_path / "flat"
    _write_image_folder(flat)
    (flat / "val" / "cat").rename(flat / "val_cat")
    (flat / "val" / "dog").rename(flat / "val_dog")
    with pytest.raises(DimapError, match="no class subfolders"):
        image_folder_datasets(flat)
    mismatched = tmp_path / "mismatched"
    _write_image_folder(mismatched)
    (mismatched / "val" / "dog").rename(mismatched / "val" / "bird")
    with pytest.raises(DimapError, match="different class folders"):
        image_folder_datasets(mismatched)
    empty_class = tmp_path / "empty_class"
    _write_image_folder(empty_class)
    (empty_class / "train" / "fish").mkdir()
    with pytest.raises(DimapError, match="at least one image"):
        image_folder_datasets(empty_class)
