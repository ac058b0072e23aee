"""The GPU path of the Plan (Triton kernels: on CUDA, or the interpreter) gives the CPU path's masks."""

import numpy as np
import pytest
import torch
from statedicts import make_state
from reference import Reference, lamp_scores
from torch.utils._python_dispatch import TorchDispatchMode

import dimap_fast
from dimap_fast.engine import triton_scores

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


@pytest.mark.parametrize("backend", ["numpy", "triton"])
def test_inference_tensors_plan_like_ordinary_ones(backend, device):
    # An inference tensor keeps no version counter (reading it raises): the plan must not need one.
    state = {k: v.to(device) for k, v in make_state(SHAPES, seed=13).items()}
    expected = dimap_fast.plan(state, backend=backend).masks(0.5)
    with torch.inference_mode():
        frozen = {k: v.clone() for k, v in state.items()}
    p = dimap_fast.plan(frozen, backend=backend)
    for name, mask in p.masks(0.5).items():
        assert torch.equal(mask, expected[name]), name


def test_masks_follow_weights_changed_in_place_after_planning(device):
    # The plan's cuts stay; the masks are of the weights as they are now, on both paths.
    state = make_state(SHAPES, seed=15)
    gpu_state = {k: v.clone().to(device) for k, v in state.items()}
    gpu = dimap_fast.plan(gpu_state, backend="triton")
    cpu = dimap_fast.plan(state, backend="numpy")
    gpu.masks(0.5)  # the kept |w| is used once before the change
    name = "layers.1.blocks.0.mlp.fc1.weight"
    for t in (state[name], gpu_state[name]):
        t.mul_(torch.linspace(0.0, 2.0, t.numel()).view(t.shape).to(t.device))
    a, b = gpu.masks(0.5), cpu.masks(0.5)
    assert all(torch.equal(a[k].cpu(), b[k]) for k in b)


class _ScalarReads(TorchDispatchMode):
    """Counts .item() / float() / int() / bool() on tensors: each is a device sync on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_masks_read_the_device_once(monkeypatch, device):
    # The same code path as on a GPU (the interpreter here): every device-to-host copy goes
    # through triton_scores.to_host, and no scalar is read off a tensor anywhere.
    state = {k: v.to(device) for k, v in make_state(SHAPES, seed=13).items()}
    copies = []
    real = triton_scores.to_host
    monkeypatch.setattr(triton_scores, "to_host", lambda t: copies.append(t.numel()) or real(t))
    with _ScalarReads() as scalars:
        p = dimap_fast.plan(state, backend="triton")
    assert (len(copies), scalars.count) == (1, 0)  # the largest magnitudes: the non-finite check
    copies.clear()
    with _ScalarReads() as scalars:
        masks = p.masks(0.4)
        p.cutoffs(0.4), p.thresholds(0.4), p.sparsity(0.4)  # the same ratio: nothing more to read
    assert (len(copies), scalars.count) == (1, 0)
    assert sorted(masks) == sorted(SHAPES)
    copies.clear()
    p.keep_counts_many([0.1, 0.2, 0.3])  # several ratios: still one read
    assert len(copies) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
def test_masks_sync_a_handful_of_times_on_cuda():
    import warnings

    state = {k: v.cuda() for k, v in make_state(SHAPES, seed=14).items()}
    p = dimap_fast.plan(state, backend="triton")
    p.masks(0.3)  # compiles outside the count
    p = dimap_fast.plan(state, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p.masks(0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 3, [str(w.message) for w in syncs]


def _neighbours(x: np.float32, k: int) -> np.ndarray:
    return (np.array([x], np.float32).view(np.int32) + np.arange(-k, k + 1, dtype=np.int32)).view(np.float32)


def _layer_scoring(target: float) -> np.ndarray:
    """|w| of a 4-weight layer [x, y, w, z] whose last score z^2 / (((x^2 + y^2) + w^2) + z^2)
    is within an ulp of a tiny target: z sets the score to ~2^-23, x and y bring the sum near
    z^2 / target, and w (just above z) moves it in steps much finer than its ulp."""
    z = np.float32(np.sqrt(target))
    z2 = np.float64(z) ** 2
    goal = z2 / target
    best = None
    for x in _neighbours(np.float32(np.sqrt(goal)), 8)[:8]:  # below the goal: room for y, w
        x2 = np.float64(x) ** 2
        y = np.float32(np.sqrt(max(goal - x2 - 2.5 * z2, 0.0)))
        y2 = np.float64(y) ** 2
        w = _neighbours(np.float32(np.sqrt(max(goal - (x2 + y2) - z2, 0.0))), 4096)
        w = w[(w >= z) & (w <= y)].astype(np.float64)
        if not w.size:
            continue
        s = z2 / (((x2 + y2) + w * w) + z2)
        k = int(np.argmin(np.abs(s - target)))
        if best is None or abs(s[k] - target) < abs(best[0] - target):
            best = (s[k], np.array([x, y, w[k], z], np.float32))
        if s[k] == target:
            break
    return best[1]


def test_cuda_masks_equal_cpu_masks_at_a_near_tie(device):
    # A module of two layers whose scores at the cut sit within an ulp of each other, where the
    # layer's score summed left to right (one plausible GPU order) differs from the shared order:
    # only a shared summation order keeps the two paths' masks equal here.
    from dimap_fast.kernels.importance import module_scores_reference

    g = torch.Generator().manual_seed(21)
    n = 64 * 80
    a = (torch.rand(n, generator=g) * 10 ** torch.empty(n).uniform_(-6, 0, generator=g)).float()
    mags_a = torch.sort(a.abs(), descending=True).values
    blocked = module_scores_reference(mags_a, torch.tensor([0, n])).numpy()
    sequential = lamp_scores(mags_a).numpy()  # the literal left-to-right sum, same ranks
    ranks = np.flatnonzero((blocked != sequential) & (blocked < 1e-10) & (blocked > 1e-13))
    assert ranks.size, "no rank where the two orders round apart"
    j = int(ranks[ranks.size // 2])
    b = _layer_scoring(float(blocked[j]))
    scores_b = module_scores_reference(torch.from_numpy(b), torch.tensor([0, 4])).numpy()
    assert abs(scores_b[3] - blocked[j]) <= np.spacing(blocked[j])  # the near-tie, built
    assert (sequential[j] >= scores_b[3]) != (blocked[j] >= scores_b[3]) or scores_b[3] == blocked[j]
    state = {
        "layers.0.blocks.0.attn.qkv.weight": torch.randn(12, 4, generator=g),
        "layers.0.blocks.0.attn.proj.weight": torch.randn(4, 4, generator=g),
        "layers.0.blocks.0.mlp.fc1.weight": a.reshape(80, 64),
        "layers.0.blocks.0.mlp.fc2.weight": torch.from_numpy(b).reshape(1, 4),
    }
    top = max(blocked[j], scores_b[3])
    keep = int((blocked > top).sum() + (scores_b > top).sum()) + 1  # the cut falls between the two
    ratio = (n + 4 - keep) / (n + 4)
    gpu = dimap_fast.plan({k: v.to(device) for k, v in state.items()}, backend="triton").masks(ratio)
    cpu = dimap_fast.plan(state, backend="numpy").masks(ratio)
    for name in state:
        assert torch.equal(gpu[name].cpu(), cpu[name]), name
    kept_a = int(cpu["layers.0.blocks.0.mlp.fc1.weight"].sum())
    assert kept_a in (j, j + 1)  # the cut is at the near-tie, not elsewhere


def test_the_plans_sort_alone_sorts_each_layer_again(device):
    # what the GPU check times as speed.plan.*.sort_ms: the same calls, the same result
    state = {k: v.to(device) for k, v in make_state(SHAPES, seed=5).items()}
    p = dimap_fast.plan(state, backend="triton")
    scorer = triton_scores.TritonScorer(p.units, "dimap")
    again = scorer.sort_again()
    assert torch.equal(again, scorer.mags)
    for slot, i in enumerate(scorer.order):
        u, start = p.units[i], int(scorer.offsets[slot])
        want = u.values.detach().abs().float().reshape(-1).sort(descending=True).values
        assert torch.equal(again[start:start + u.numel], want), u.name
