"""The same input gives the same masks, bit for bit: across plans, across processes, CPU and GPU path."""

import hashlib

import pytest
import torch
from statedicts import make_state

import dimap_fast
from dimap_fast.io.checkpoint import save_pruned

SHAPES = {
    "layers.0.blocks.0.attn.qkv.weight": (96, 32), "layers.0.blocks.0.attn.proj.weight": (32, 32),
    "layers.0.blocks.0.mlp.fc1.weight": (128, 32), "layers.0.blocks.0.mlp.fc2.weight": (32, 128),
    "layers.1.blocks.0.attn.qkv.weight": (48, 16), "layers.1.blocks.0.attn.proj.weight": (16, 16),
    "layers.1.blocks.0.mlp.fc1.weight": (64, 16), "layers.1.blocks.0.mlp.fc2.weight": (16, 64),
}


def tied_state(dtype=torch.float32):
    """Weights with many exact ties, zeros and fp32 denormals: where an order could slip."""
    state = make_state(SHAPES, seed=3)
    for i, name in enumerate(state):
        w = torch.round(state[name] * 4) / 4
        w.view(-1)[:: 7] = 0.0
        w.view(-1)[3:: 11] = 1e-40 * (1 + i % 3)
        state[name] = w.to(dtype)
    return state


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("method", ["dimap", "global", "uniform"])
def test_two_plans_give_the_same_masks_and_the_same_file_bytes(tmp_path, method):
    state = tied_state()
    a, b = dimap_fast.plan(state, method=method), dimap_fast.plan(dict(state), method=method)
    for ratio in (0.0, 0.3, 0.5, 0.77):
        ma, mb = a.masks(ratio), b.masks(ratio)
        assert list(ma) == list(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)
    save_pruned(tmp_path / "a.safetensors", {}, a.masks(0.5), {"method": method, "ratio": "0.5", "source": "x"})
    save_pruned(tmp_path / "b.safetensors", {}, b.masks(0.5), {"method": method, "ratio": "0.5", "source": "x"})
    assert sha(tmp_path / "a.safetensors") == sha(tmp_path / "b.safetensors")


# Two separate processes writing the same bytes: test_trust_interrupt.py::test_separate_processes_write_identical_bytes
# (the sweep processes started there, side by side, compared with each other and with this process).


@pytest.mark.parametrize("method", ["dimap", "global", "uniform"])
def test_cpu_and_gpu_paths_give_identical_masks_for_fp32(method, device):
    """backend='numpy' (the CPU path) and backend='triton' (the GPU kernels; the interpreter on a CPU)."""
    state = {k: v for k, v in tied_state().items() if k.startswith("layers.1.")}  # small: the interpreter is slow
    cpu = dimap_fast.plan(state, method=method, backend="numpy")
    gpu = dimap_fast.plan({k: v.to(device) for k, v in state.items()}, method=method, backend="triton")
    for ratio in (0.25, 0.5, 0.9):
        a, b = cpu.masks(ratio), gpu.masks(ratio)
        for name in a:
            assert torch.equal(a[name].cpu(), b[name].cpu()), f"{method} r={ratio}: {name}"
