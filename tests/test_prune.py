"""prune_: in place, to a ratio or a FLOPs budget, returning the guard that keeps the zeros."""

import copy
import dataclasses

import pytest
import timm
import torch

import dimap_fast
from dimap_fast import DimapError, FlopsReduction, MaskHandle, Method, Pattern, prune_

CONFIG = dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10)


def small_swin(seed=0):
    torch.manual_seed(seed)
    return timm.models.swin_transformer.SwinTransformer(**CONFIG).eval()


@pytest.mark.parametrize("pattern,method", [
    ("unstructured", "dimap"), (Pattern.block(16), Method.GLOBAL), (Pattern.channel(), "uniform"), (Pattern.nm(2, 4), "dimap"),
])
def test_prunes_in_place_with_the_masks_of_compute_masks(pattern, method):
    model = small_swin(1)
    original = copy.deepcopy(model)
    ratio = 0.5 if Pattern.parse(pattern).kind == "n:m" else 0.4
    handle = prune_(model, ratio, pattern=pattern, method=method)
    expected = dimap_fast.compute_masks(original, ratio, method=method, pattern=pattern)
    assert isinstance(handle, MaskHandle) and handle.active
    assert handle.pruning.ratio == ratio and handle.pruning.flops_reduction is None
    assert handle.pruning.pattern == Pattern.parse(pattern) and handle.pruning.method == Method.parse(method)
    params, before = dict(model.named_parameters()), dict(original.named_parameters())
    for name, mask in expected.items():
        assert torch.equal(params[name], before[name] * mask), name
    assert sum(int((~m).sum()) for m in expected.values()) > 0
    for name in before.keys() - expected.keys():
        assert torch.equal(params[name], before[name]), name  # nothing else is touched


def test_old_keywords_work_too():
    model, original = small_swin(2), small_swin(2)
    prune_(model, 0.3, pattern="block", block_size=16)
    expected = dimap_fast.compute_masks(original, 0.3, pattern="block", block_size=16)
    params, before = dict(model.named_parameters()), dict(original.named_parameters())
    assert all(torch.equal(params[k], before[k] * m) for k, m in expected.items())


@pytest.mark.parametrize("pattern", ["unstructured", Pattern.block(16)])
def test_a_flops_budget_picks_the_ratio_of_ratio_for_flops(pattern):
    model = small_swin(3)
    expected = dimap_fast.plan(copy.deepcopy(model), pattern=pattern).ratio_for_flops(0.4)
    handle = prune_(model, FlopsReduction(0.4), pattern=pattern)
    assert handle.pruning.ratio == expected
    measured = dimap_fast.report(model)["flops"]["reduction"]
    assert measured == handle.pruning.flops_reduction
    assert 0.4 <= measured < 0.41


def test_the_guard_keeps_zeros_until_removed():
    model = small_swin(4).train()
    handle = prune_(model, 0.5)
    pruned = {name: p == 0 for name, p in model.named_parameters() if name.endswith("mlp.fc1.weight")}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    def step():
        opt.zero_grad()
        model(torch.randn(2, 3, 32, 32)).square().mean().backward()
        opt.step()

    step()
    params = dict(model.named_parameters())
    assert all(bool((params[k][z] == 0).all()) for k, z in pruned.items())
    handle.remove()
    assert not handle.active
    step()
    assert any(bool((params[k][z] != 0).any()) for k, z in pruned.items())  # no guard: training revives them


BAD = [
    ("ratio 1", lambda: prune_(small_swin(), 1.0), "ratio must be in [0, 1), got 1.0: it is the fraction of weights to remove"),
    ("budget above 1", lambda: prune_(small_swin(), FlopsReduction(1.2)),
     "a FLOPs reduction must be in [0, 1), got 1.2: it is the fraction of the dense FLOPs to remove"),
    ("a state dict", lambda: prune_(dict(small_swin().state_dict()), 0.5),
     "prune_ prunes a torch.nn.Module in place, got dict: for a state dict use compute_masks"),
    ("2:4 with a budget", lambda: prune_(small_swin(), FlopsReduction(0.3), pattern="2:4"),
     "pattern '2:4' removes half of every prunable weight, a fixed share of the FLOPs: prune it at ratio 0.5 instead of "
     "asking for a FLOPs reduction"),
    ("block size on a value", lambda: prune_(small_swin(), 0.5, pattern=Pattern.channel(), block_size=16),
     "Pattern.channel() carries its own block size: drop block_size=16"),
]


@pytest.mark.parametrize("call,message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_refusals_touch_nothing(call, message):
    with pytest.raises(DimapError) as info:
        call()
    assert str(info.value) == message


def test_a_refused_budget_leaves_the_model_as_it_was():
    model = small_swin(5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DimapError, match="out of reach"):
        prune_(model, FlopsReduction(0.95))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not getattr(model, "_dimap_handles", [])


def test_the_handle_says_how_its_masks_were_chosen():
    model = small_swin(6)
    masks = dimap_fast.compute_masks(copy.deepcopy(model), 0.3)
    assert dimap_fast.apply_masks(model, masks).pruning is None  # masks a caller brought: nothing known
    told = dimap_fast.Pruning(0.3, "block16", "global")  # names are read into values once
    assert told.pattern == Pattern.block(16) and told.method is Method.GLOBAL
    assert dimap_fast.apply_masks(model, masks, told).pruning is told
    assert MaskHandle(model, masks, pruning=told).pruning is told
    with pytest.raises(DimapError, match="^pruning must be a dimap_fast.Pruning or None, got dict$"):
        MaskHandle(model, masks, pruning={"ratio": 0.3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        told.ratio = 0.5


def test_a_channel_budget_records_ratio_pattern_method_and_reduction():
    model = small_swin(7)
    handle = prune_(model, FlopsReduction(0.3), pattern="channel", method="uniform")
    expected = dimap_fast.plan(small_swin(7), pattern="channel", method="uniform")
    assert handle.pruning == dimap_fast.Pruning(expected.ratio_for_flops(0.3), Pattern.channel(), Method.UNIFORM,
                                                expected.flops_reduction(expected.ratio_for_flops(0.3)))
    assert handle.pruning.flops_reduction >= 0.3
    shrunk = dimap_fast.report(dimap_fast.shrink(model))["flops"]["dense"]
    assert 1 - shrunk / dimap_fast.report(small_swin(7))["flops"]["dense"] == handle.pruning.flops_reduction
