"""shrink(): a channel-pruned Swin made smaller gives the masked model's logits, and round-trips."""

import copy

import pytest
import timm
import torch

import dimap_fast
from dimap_fast import DimapError
from dimap_fast.io.models import save_shrunk
from dimap_fast.io.models import load_shrunk
from dimap_fast.shrink import block_sizes, shrink

CONFIG = dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10)


def small_swin(seed=0):
    torch.manual_seed(seed)
    return timm.models.swin_transformer.SwinTransformer(**CONFIG).eval()


def channel_pruned(model, ratio):
    plan = dimap_fast.plan(model, pattern="channel")
    plan.prune_(ratio)
    return plan


def shrunk_matching_masked(model, x):
    """shrink() of a copy, asserted to give the masked model's logits on x."""
    with torch.no_grad():
        masked = model(x)
        small = shrink(copy.deepcopy(model))
        out = small(x)
    assert (out - masked).abs().max() < 1e-4
    return small


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.95])
def test_shrunk_small_swin_equals_masked(ratio):
    model = small_swin()
    channel_pruned(model, ratio)
    small = shrunk_matching_masked(model, torch.randn(3, 3, 32, 32))
    dense_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) < dense_params
    sizes = block_sizes(small)
    assert any(v["heads"] < h for v, h in zip(sizes.values(), [2, 2, 4, 4]))
    if ratio == 0.95:
        assert all(v["heads"] >= 1 and v["hidden"] >= 1 for v in sizes.values())
        assert min(v["heads"] for v in sizes.values()) == 1  # a layer left with one head still runs


def test_shrunk_swin_tiny_equals_masked():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224").eval()
    channel_pruned(model, 0.5)
    small = shrunk_matching_masked(model, torch.randn(1, 3, 224, 224))
    rep_dense, rep_small = dimap_fast.report(model), dimap_fast.report(small)
    assert rep_small["flops"]["dense"] < 0.75 * rep_dense["flops"]["dense"]


def test_save_and_load_round_trip(tmp_path):
    model = small_swin(1)
    channel_pruned(model, 0.5)
    small = shrink(model)
    path = tmp_path / "small.safetensors"
    with pytest.raises(DimapError, match="architecture"):
        save_shrunk(small, path)
    assert not path.exists()

    save_shrunk(small, path, config=CONFIG)
    loaded = load_shrunk(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert block_sizes(loaded) == block_sizes(small)


def test_aligned_widths_are_multiples_of_eight_and_exact():
    model = small_swin(2)
    channel_pruned(model, 0.37)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        masked = model(x)
        aligned = shrink(copy.deepcopy(model), align=8)
        tight = shrink(copy.deepcopy(model), align=1)
        assert (aligned(x) - masked).abs().max() < 1e-4
        assert (tight(x) - masked).abs().max() < 1e-4
    widths = [v["hidden"] for v in block_sizes(aligned).values()]
    assert all(w % 8 == 0 for w in widths)
    assert sum(widths) >= sum(v["hidden"] for v in block_sizes(tight).values())
