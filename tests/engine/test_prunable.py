"""prunable.py: which weights a model or state dict offers, and in which DIMAP module."""

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer

from dimap_fast import SWIN_MODULES, DimapError
from dimap_fast.engine.prunable import named_tensors, prunable_layers, prune_count


def small():
    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2,), num_heads=(2,),
                           num_classes=3)


def test_a_swin_offers_its_four_linears_per_block_in_natural_name_order():
    layers = prunable_layers(small())
    assert [(layer.name.split(".", 3)[-1], layer.module) for layer in layers[:4]] == [
        ("0.attn.proj.weight", "PRJ-M"), ("0.attn.qkv.weight", "QKV-M"), ("0.mlp.fc1.weight", "MLP-M"),
        ("0.mlp.fc2.weight", "MLP-M")]
    assert len(layers) == 8 and all(layer.name.startswith("layers.0.blocks.") for layer in layers)


def test_a_model_and_its_state_dict_offer_the_same_tensors():
    model = small()
    by_model = {layer.name: layer.tensor for layer in prunable_layers(model)}
    by_state = {layer.name: layer.tensor for layer in prunable_layers(model.state_dict())}
    assert by_model.keys() == by_state.keys()
    assert all(torch.equal(by_model[k], by_state[k]) for k in by_model)
    assert named_tensors(model).keys() >= by_model.keys()


def test_a_user_map_overrides_the_family_map():
    layers = prunable_layers(small(), module_map={"MLP-M": ["*mlp.fc1.weight"]})
    assert {layer.module for layer in layers} == {"MLP-M"} and len(layers) == 2
    assert set(SWIN_MODULES) == {"QKV-M", "PRJ-M", "MLP-M"}


def test_overlapping_or_empty_maps_are_refused():
    with pytest.raises(DimapError, match="disjoint"):
        prunable_layers(small(), module_map={"A": ["*fc1.weight"], "B": ["*mlp.fc1.*"]})
    with pytest.raises(DimapError):
        prunable_layers(small(), module_map={"A": []})


def test_prune_count_rounds_halves_up():
    assert [prune_count(r, 10) for r in (0.0, 0.25, 0.35, 0.5, 0.99)] == [0, 3, 4, 5, 10]
