"""The GPU path of the Plan (Triton kernels: on CUDA, or the interpreter) gives the CPU path's masks."""

import pytest
import torch
from statedicts import make_state
from reference import Reference

import dimap_fast

SHAPES = {
    "layers.0.blocks.0.attn.qkv.weight": (12, 4),
    "layers.0.blocks.0.attn.proj.weight": (4, 4),
    "layers.0.blocks.0.mlp.fc1.weight": (16, 4),
    "layers.0.blocks.0.mlp.fc2.weight": (4, 16),
    "layers.1.blocks.0.attn.qkv.weight": (24, 8),
    "layers.1.blocks.0.attn.proj.weight": (8, 8),
    "layers.1.blocks.0.mlp.fc1.weight": (32, 8),
    "layers.1.blocks.0.mlp.fc2.weight": (8, 32),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["dimap", "global", "uniform"])
def test_triton_plan_equals_numpy_plan_and_reference(method, dtype, device):
    state = make_state(SHAPES, seed=11, dtype=dtype)
    state["layers.1.blocks.0.mlp.fc1.weight"][:4] = 0  # zeros
    state["layers.0.blocks.0.mlp.fc2.weight"] = torch.round(state["layers.0.blocks.0.mlp.fc2.weight"] * 2) / 2  # ties
    gpu = dimap_fast.plan({k: v.to(device) for k, v in state.items()}, method=method, backend="triton")
    cpu = dimap_fast.plan(state, method=method, backend="numpy")
    ref = Reference(state, method)
    ratios = [0.0, 0.3, 0.5, 0.9]
    many = gpu.keep_counts_many(ratios)
    for r, ratio in enumerate(ratios):
        assert (many[r] == cpu.keep_counts(ratio)).all()
        a, b, c = gpu.masks(ratio), cpu.masks(ratio), ref.masks(ratio)
        for name in c:
            assert a[name].device.type == device.type
            assert torch.equal(a[name].cpu(), c[name]) and torch.equal(b[name], c[name]), name
        if method != "uniform":
            assert gpu.thresholds(ratio) == pytest.approx(cpu.thresholds(ratio), rel=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "triton"])
def test_prune_in_place_zeroes_exactly_the_masked_weights(backend, device):
    state = {k: v.to(device) for k, v in make_state(SHAPES, seed=12).items()}
    original = {k: v.clone() for k, v in state.items()}
    p = dimap_fast.plan(state, backend=backend)
    expected = p.masks(0.45)
    masks = p.prune_(0.45)
    for name, mask in expected.items():
        assert torch.equal(masks[name], mask)
        assert torch.equal(state[name], original[name] * mask)
