"""Structured patterns: block tiles, channels (neurons and heads), 2:4, against literal references."""

import pytest
import timm
import torch
from reference import literal_unit_keep

import dimap_fast
from dimap_fast import DimapError


def small_swin(seed=0):
    torch.manual_seed(seed)
    return timm.models.swin_transformer.SwinTransformer(
        img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10
    )


def tile_energies(w, b):
    rows, cols = w.shape
    out = []
    for i in range(0, rows, b):
        for j in range(0, cols, b):
            out.append(float((w[i : i + b, j : j + b].double() ** 2).sum()))
    return out


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("method", ["dimap", "global"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_block_pattern_equals_literal_tiles(block, method, ratio):
    model = small_swin()
    masks = dimap_fast.compute_masks(model, ratio, method=method, pattern="block", block_size=block)
    params = dict(model.named_parameters())
    for module in (["QKV-M"], ["PRJ-M"], ["MLP-M"]) if method == "dimap" else (["QKV-M", "PRJ-M", "MLP-M"],):
        names = [n for n in masks if _module_of(n) in module]
        kept = literal_unit_keep([tile_energies(params[n].detach(), block) for n in names], ratio, method)
        for n, k in zip(names, kept):
            w = params[n]
            tr, tc = -(-w.shape[0] // block), -(-w.shape[1] // block)
            expect = torch.from_numpy(k.reshape(tr, tc)).repeat_interleave(block, 0).repeat_interleave(block, 1)
            assert torch.equal(masks[n], expect[: w.shape[0], : w.shape[1]]), n


def _module_of(name):
    if name.endswith("attn.qkv.weight"):
        return "QKV-M"
    if name.endswith("attn.proj.weight"):
        return "PRJ-M"
    return "MLP-M"


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
def test_channel_pattern_equals_literal_groups(ratio):
    model = small_swin(1)
    sd = model.state_dict()
    masks = dimap_fast.compute_masks(model, ratio, pattern="channel")
    blocks = sorted({n.rsplit(".mlp", 1)[0] for n in sd if n.endswith("mlp.fc1.weight")})
    neurons = []
    for b in blocks:
        w1, b1, w2 = sd[f"{b}.mlp.fc1.weight"].double(), sd[f"{b}.mlp.fc1.bias"].double(), sd[f"{b}.mlp.fc2.weight"].double()
        neurons.append([float((w1[i] ** 2).sum() + b1[i] ** 2 + (w2[:, i] ** 2).sum()) for i in range(w1.shape[0])])
    for b, keep in zip(blocks, literal_unit_keep(neurons, ratio, "dimap", floor_one=True)):
        k = torch.from_numpy(keep)
        assert torch.equal(masks[f"{b}.mlp.fc1.weight"], k[:, None].expand_as(masks[f"{b}.mlp.fc1.weight"]))
        assert torch.equal(masks[f"{b}.mlp.fc2.weight"], k[None, :].expand_as(masks[f"{b}.mlp.fc2.weight"]))
    heads = []
    for b in blocks:
        wq, bq, wp = sd[f"{b}.attn.qkv.weight"].double(), sd[f"{b}.attn.qkv.bias"].double(), sd[f"{b}.attn.proj.weight"].double()
        nh = sd[f"{b}.attn.relative_position_bias_table"].shape[1]
        dim = wp.shape[0]
        hd = dim // nh
        e = []
        for h in range(nh):
            rows = [p * dim + h * hd + i for p in range(3) for i in range(hd)]
            e.append(float((wq[rows] ** 2).sum() + (bq[rows] ** 2).sum() + (wp[:, h * hd : (h + 1) * hd] ** 2).sum()))
        heads.append(e)
    for b, keep in zip(blocks, literal_unit_keep(heads, ratio, "dimap", floor_one=True)):
        nh = len(keep)
        dim = sd[f"{b}.attn.proj.weight"].shape[0]
        cols = torch.from_numpy(keep).repeat_interleave(dim // nh)
        assert torch.equal(masks[f"{b}.attn.proj.weight"], cols[None, :].expand(dim, dim))
        rows = cols.repeat(3)
        assert torch.equal(masks[f"{b}.attn.qkv.weight"], rows[:, None].expand(3 * dim, dim))


def test_channel_keeps_one_unit_per_layer_at_extreme_ratio():
    model = small_swin(2)
    p = dimap_fast.plan(model, pattern="channel")
    counts = p.keep_counts(0.99)
    assert (counts >= 1).all()
    assert set(p.sparsity(0.5)["modules"]) == {"ATTN-M", "MLP-M"}


def test_two_four_keeps_the_two_largest_of_every_four():
    model = small_swin(3)
    masks = dimap_fast.compute_masks(model, 0.5, pattern="2:4")
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        groups = mask.reshape(-1, 4)
        assert (groups.sum(1) == 2).all()
        mags = params[name].detach().abs().reshape(-1, 4)
        assert (mags[groups].reshape(-1, 2).min(1).values >= mags[~groups].reshape(-1, 2).max(1).values).all()
    with pytest.raises(DimapError, match="ratio 0.5"):
        dimap_fast.compute_masks(model, 0.3, pattern="2:4")


def test_bad_pattern_and_block_size_are_refused():
    model = small_swin()
    with pytest.raises(DimapError, match="unknown pattern"):
        dimap_fast.compute_masks(model, 0.5, pattern="diagonal")
    with pytest.raises(DimapError, match="block_size"):
        dimap_fast.compute_masks(model, 0.5, pattern="block", block_size=24)


def test_block_pruned_model_converts_to_the_same_logits():
    model = small_swin(4).eval()
    dimap_fast.plan(model, pattern="block", block_size=16).prune_(0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        dimap_fast.convert(model, block=16, choose="kernel")
        after = model(x)
    assert (after - before).abs().max() < 1e-5
    assert any(type(m).__name__ == "SparseLinear" for m in model.modules())
