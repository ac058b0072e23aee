"""The engine's masks equal a literal implementation of Eq. 10, element for element."""

import pytest
import torch
from reference import Reference

import dimap_fast

RATIOS = [0.0, 0.15, 0.35, 0.5, 0.55, 0.9]


@pytest.fixture(scope="module", params=["dimap", "global", "uniform"])
def method_pair(request, swin_tiny_state):
    method = request.param
    return method, Reference(swin_tiny_state, method), dimap_fast.plan(swin_tiny_state, method=method)


@pytest.mark.parametrize("ratio", RATIOS)
def test_swin_tiny_masks_equal_reference(method_pair, ratio):
    method, ref, plan = method_pair
    expected = ref.masks(ratio)
    got = plan.masks(ratio)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), f"{method} r={ratio}: {name} differs"


@pytest.mark.parametrize("method", ["dimap", "global", "uniform"])
def test_compute_masks_equal_reference(swin_tiny_state, method):
    # compute_masks is built on plan(); the literal reference shares no code with either
    got = dimap_fast.compute_masks(swin_tiny_state, 0.5, method=method)
    expected = Reference(swin_tiny_state, method).masks(0.5)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), f"{method}: {name} differs"


@pytest.mark.parametrize("method", ["dimap", "global"])
def test_each_group_loses_exactly_its_share(swin_tiny_state, method):
    plan = dimap_fast.plan(swin_tiny_state, method=method)
    masks = plan.masks(0.35)
    groups = {}
    for layer in plan.layers:
        key = layer.module if method == "dimap" else "all"
        kept, size = groups.get(key, (0, 0))
        groups[key] = (kept + int(masks[layer.name].sum()), size + layer.numel)
    for kept, size in groups.values():
        assert size - kept == int(0.35 * size + 0.5)


def test_model_and_state_dict_agree(swin_tiny_state):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224")
    a = dimap_fast.compute_masks(model, 0.55)
    b = dimap_fast.compute_masks(swin_tiny_state, 0.55)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_and_model_give_the_same_masks(tmp_path, swin_tiny_state):
    """A safetensors file lists names alphabetically; the layer order (and so ties) must not care."""
    from safetensors.torch import save_file

    from dimap_fast.io.checkpoint import load_state_dict

    state = {k: (v * 8).round() / 8 if k.endswith("weight") else v for k, v in swin_tiny_state.items()}  # ties
    path = tmp_path / "t.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded, _ = load_state_dict(path)
    for method in ("dimap", "global"):
        a = dimap_fast.compute_masks(state, 0.5, method=method)
        b = dimap_fast.compute_masks(loaded, 0.5, method=method)
        assert all(torch.equal(a[k], b[k]) for k in a)
