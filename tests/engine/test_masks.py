"""apply_masks zeroes in place and keeps pruned weights zero through real optimizer steps."""

import pytest
import timm
import torch

import dimap_fast
from dimap_fast import DimapError, MaskHandle, apply_masks, make_permanent
from dimap_fast.engine.masks import MaskLeakError


def small_model():
    torch.manual_seed(0)
    return timm.models.swin_transformer.SwinTransformer(
        img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=10
    )


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.SGD])
def test_pruned_weights_stay_zero_through_training(opt_cls):
    model = small_model()
    masks = dimap_fast.compute_masks(model, 0.6)
    handle = apply_masks(model, masks)
    kwargs = {"lr": 1e-2, "weight_decay": 0.05}
    if opt_cls is torch.optim.SGD:
        kwargs["momentum"] = 0.9
    opt = opt_cls(model.parameters(), **kwargs)
    params = dict(model.named_parameters())
    before = {k: params[k].detach().clone() for k in masks}
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for name, mask in masks.items():
            assert (params[name].grad[~mask] == 0).all()
        opt.step()
        for name, mask in masks.items():
            assert (params[name][~mask] == 0).all(), name
    assert any(not torch.equal(params[k][masks[k]], before[k][masks[k]]) for k in masks)  # training happened
    assert handle.active
    make_permanent(model)
    assert not handle.active
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    revived = sum(int((params[k][~m] != 0).sum()) for k, m in masks.items())
    assert revived > 0  # once permanent, nothing guards the zeros any more


def _sgd_step(layer, opt):
    opt.zero_grad()
    layer(torch.ones(3, 4)).pow(2).sum().backward()
    opt.step()


def test_handle_remove_really_stops_the_guard():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 6)
    keep = torch.rand(6, 4) < 0.5
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    _sgd_step(layer, opt)  # momentum from before the masks: only the re-zeroing after each step stops it
    handle = apply_masks(layer, {"weight": keep})
    for _ in range(3):
        _sgd_step(layer, opt)
        assert torch.count_nonzero(layer.weight[~keep]) == 0
        assert torch.count_nonzero(layer.weight.grad[~keep]) == 0  # the gradient hook
        handle.check("in the test")
    assert handle.active
    handle.remove()
    assert not handle.active
    _sgd_step(layer, opt)
    assert torch.count_nonzero(layer.weight.grad[~keep]) > 0  # no gradient hook any more
    assert torch.count_nonzero(layer.weight[~keep]) > 0  # and no re-zeroing after the step
    with pytest.raises(MaskLeakError, match=r"nonzero after remove: \{'weight': \d+\}"):
        handle.check("after remove")


def test_guard_as_context_manager_zeroes_then_lets_go():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 6)
    keep = torch.rand(6, 4) < 0.5
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    with MaskHandle(layer, {"weight": keep}) as guard:
        assert torch.count_nonzero(layer.weight[~keep]) == 0  # zeroed on construction
        _sgd_step(layer, opt)
        guard.check()
        assert guard.masks["weight"].equal(keep)
    assert not guard.active
    with torch.no_grad():
        layer.weight[~keep] = 1.0  # nothing guards it now, and check() says so
    with pytest.raises(MaskLeakError):
        guard.check()


def test_masks_checked_before_anything_changes():
    model = small_model()
    masks = dimap_fast.compute_masks(model, 0.5)
    name = next(iter(masks))
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(masks)
    bad[name] = masks[name].float()
    with pytest.raises(DimapError, match="bool tensor"):
        apply_masks(model, bad)
    bad = dict(masks)
    bad["no.such.weight"] = masks[name]
    with pytest.raises(DimapError, match="names no parameter"):
        apply_masks(model, bad)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_report_counts_zeros_and_flops():
    model = small_model()
    dense = dimap_fast.report(model)
    apply_masks(model, dimap_fast.compute_masks(model, 0.5))
    rep = dimap_fast.report(model)
    for m in ("QKV-M", "PRJ-M", "MLP-M"):
        assert rep["modules"][m]["sparsity"] == pytest.approx(0.5, abs=1e-6)
    pruned_weights = sum(m["zeros"] for m in rep["modules"].values())
    assert rep["params"]["pruned"] == dense["params"]["dense"] - pruned_weights
    assert rep["flops"]["dense"] == dense["flops"]["dense"]
    assert dense["flops"]["pruned"] == dense["flops"]["dense"]
    assert rep["flops"]["pruned"] < rep["flops"]["dense"]
    make_permanent(model)


def test_swin_tiny_flops_match_the_published_figure():
    model = timm.create_model("swin_tiny_patch4_window7_224")
    rep = dimap_fast.report(model, input_size=224)
    assert rep["flops"]["dense"] / 1e9 == pytest.approx(4.5, abs=0.05)  # Swin paper: 4.5G
    assert rep["params"]["dense"] / 1e6 == pytest.approx(28.3, abs=0.1)


def test_model_without_prunable_weights_is_refused():
    with pytest.raises(DimapError, match="no prunable weight"):
        dimap_fast.compute_masks(torch.nn.Sequential(torch.nn.Linear(4, 4)), 0.5)


def test_custom_module_map_for_another_hierarchical_vit():
    model = torch.nn.ModuleDict({"stage": torch.nn.ModuleDict({"attn": torch.nn.Linear(8, 24), "ffn": torch.nn.Linear(8, 32)})})
    masks = dimap_fast.compute_masks(model, 0.25, module_map={"ATT": ["*.attn.weight"], "FFN": ["*.ffn.weight"]})
    assert set(masks) == {"stage.attn.weight", "stage.ffn.weight"}
    assert int((~masks["stage.ffn.weight"]).sum()) == 64
