"""Scores and selection on small hand-made layers: ties, zeros, tiny layers, half precision."""

import importlib
import math

import numpy as np
import pytest
import torch
from statedicts import make_state
from hypothesis import example, given, settings
from hypothesis import strategies as st
from reference import Reference, lamp_scores

import dimap_fast
from dimap_fast.engine.scores import GROUP, RUN, LayerState, sorted_negated_magnitudes

SHAPES = {
    "layers.0.blocks.0.attn.qkv.weight": (24, 8),
    "layers.0.blocks.0.attn.proj.weight": (8, 8),
    "layers.0.blocks.0.mlp.fc1.weight": (32, 8),
    "layers.0.blocks.0.mlp.fc2.weight": (8, 32),
    "layers.1.blocks.0.attn.qkv.weight": (48, 16),
    "layers.1.blocks.0.attn.proj.weight": (16, 16),
    "layers.1.blocks.0.mlp.fc1.weight": (64, 16),
    "layers.1.blocks.0.mlp.fc2.weight": (16, 64),
}


def assert_same(got, expected):
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_largest_weight_scores_one_and_zeros_score_zero():
    w = torch.tensor([0.0, 3.0, -1.0, 0.0, 2.0])
    s = lamp_scores(w)
    assert s[1] == 1.0 and s[0] == 0.0 and s[3] == 0.0
    state = LayerState(sorted_negated_magnitudes(w), "dimap")
    keys = state.keys(0, 5)
    assert keys[0] == 1.0 and keys[-1] == 0.0
    assert np.all(np.diff(keys) <= 0)


def test_all_zero_layer_scores_zero_not_nan():
    state = LayerState(sorted_negated_magnitudes(torch.zeros(300)), "dimap")
    keys = state.keys(0, 300)
    assert not np.isnan(keys).any() and (keys == 0).all()


def blocked_prefix_literally(sq: list[float]) -> list[float]:
    """The shared summation order, one float64 add at a time: S_j = R_g + (q_k + p_j)."""
    out, top, q, p = [], 0.0, 0.0, 0.0
    for j, x in enumerate(sq):
        if j % (RUN * GROUP) == 0:
            top, q, p = top + q + p if j else 0.0, 0.0, 0.0  # R += U (U = q + last run's p)
        elif j % RUN == 0:
            q, p = q + p, 0.0
        p += x
        out.append(top + (q + p))
    return out


@pytest.mark.parametrize("n", [5 * RUN + 17, 2 * RUN * GROUP + 3 * RUN + 5])
def test_keys_follow_the_shared_summation_order_bit_for_bit(n):
    w = torch.randn(n, generator=torch.Generator().manual_seed(3)) * torch.rand(n, generator=torch.Generator().manual_seed(4)) ** 8
    state = LayerState(sorted_negated_magnitudes(w), "dimap")
    full = state.keys(0, n)
    for start in range(0, n, 7 * RUN):
        assert np.array_equal(state.keys(start, min(start + 2 * RUN, n)), full[start : start + 2 * RUN])
    mags = np.sort(np.abs(w.numpy()))[::-1].astype(np.float64)
    sq = (mags * mags).tolist()
    s = np.array(blocked_prefix_literally(sq))
    assert np.array_equal(full, np.where(s > 0, np.array(sq) / np.where(s > 0, s, 1), 0.0))
    assert np.all(np.diff(s) >= 0) and np.all(np.diff(full) <= 0)  # never increasing, by construction
    ref = torch.sort(lamp_scores(w), descending=True).values.numpy()  # the literal sequential sum
    assert np.allclose(full, ref, rtol=1e-13, atol=0)


@pytest.mark.parametrize("method", ["dimap", "global"])
@pytest.mark.parametrize("squared", [False, True])
def test_band_keys_equal_each_layers_keys(method, squared):
    # a budget's search reads every layer's band at once: the same numbers, bit for bit
    from dimap_fast.engine.scores import band_keys

    g = torch.Generator().manual_seed(11)
    sizes = [1, RUN - 3, 3 * RUN, 2 * RUN * GROUP + 5, 7]
    states = []
    for n in sizes:
        w = torch.randn(n, generator=g)
        neg = sorted_negated_magnitudes(w * w if squared else w).astype(np.float64 if squared else np.float32)
        states.append(LayerState(neg, method, squared))
    starts = [0, 0, RUN, RUN * GROUP, 0]
    lengths = np.array([1, 0, 2 * RUN - 1, RUN * GROUP + 5, 7])
    want = np.concatenate([s.keys(a, a + n) for s, a, n in zip(states, starts, lengths)])
    got = band_keys(states, starts, lengths)
    assert got.dtype == np.float64 and np.array_equal(got, want)


@pytest.mark.parametrize("method", ["dimap", "global", "uniform"])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.75, 0.99])
def test_small_model_equals_reference(method, ratio):
    state = make_state(SHAPES, seed=1)
    assert_same(dimap_fast.compute_masks(state, ratio, method=method), Reference(state, method).masks(ratio))


@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("method", ["dimap", "global", "uniform"])
def test_heavy_ties_follow_the_flat_index_rule(monkeypatch, method, chunk):
    if chunk:  # masks are built MASK_CHUNK weights at a time: a small one spreads a cutoff's ties over many
        monkeypatch.setattr(importlib.import_module("dimap_fast.engine.plan"), "MASK_CHUNK", chunk)
    g = torch.Generator().manual_seed(2)
    state = {k: torch.randint(-3, 4, s, generator=g).float() * 0.25 for k, s in SHAPES.items()}
    ref = Reference(state, method)
    plan = dimap_fast.plan(state, method=method)
    for ratio in [0.2, 0.45, 0.6, 0.9]:
        assert_same(plan.masks(ratio), ref.masks(ratio))


def test_zeros_and_an_all_zero_layer():
    state = make_state(SHAPES, seed=4)
    state["layers.0.blocks.0.mlp.fc1.weight"].zero_()
    state["layers.1.blocks.0.attn.qkv.weight"][:, :5] = 0
    for method in ["dimap", "global", "uniform"]:
        ref = Reference(state, method)
        plan = dimap_fast.plan(state, method=method)
        for ratio in [0.1, 0.3, 0.7]:
            assert_same(plan.masks(ratio), ref.masks(ratio))


def test_one_element_layer():
    state = make_state(SHAPES, seed=5)
    state["layers.0.blocks.0.attn.proj.weight"] = torch.tensor([[0.5]])
    for ratio in [0.0, 0.3, 0.6, 0.95]:
        assert_same(dimap_fast.compute_masks(state, ratio), Reference(state).masks(ratio))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(dtype):
    state = make_state(SHAPES, seed=6, dtype=dtype)
    for method in ["dimap", "global", "uniform"]:
        got = dimap_fast.compute_masks(state, 0.5, method=method)
        assert_same(got, Reference(state, method).masks(0.5))
        assert all(m.dtype == torch.bool and m.shape == state[k].shape for k, m in got.items())


def test_cutoffs_thresholds_sparsity_agree_with_masks():
    state = make_state(SHAPES, seed=7)
    plan = dimap_fast.plan(state)
    masks = plan.masks(0.4)
    cuts = plan.cutoffs(0.4)
    for name, mask in masks.items():
        kept = state[name].abs()[mask]
        assert cuts[name].keep == int(mask.sum())
        assert float(kept.min()) == cuts[name].magnitude
    sp = plan.sparsity(0.4)
    for module, value in sp["modules"].items():
        assert math.isclose(value, 0.4, abs_tol=1.0 / 64)
    ref = Reference(state)
    th = plan.thresholds(0.4)
    for members, _ in ref.groups:
        module = [m for n, m, _ in ref.layers if n == members[0][0]][0]
        kept_scores = torch.cat([lamp_scores(w)[masks[n].reshape(-1)] for n, w in members])
        # the plan sums in the shared blocked order, the reference left to right: an ulp apart
        assert th[module] == pytest.approx(float(kept_scores.min()), rel=1e-13)


@settings(max_examples=60, deadline=None)
# Three layers ending in a one-weight run of zeros: those runs' corrections pulled the zeros' tie
# group's counts below the group before it, and the bracket's binary search went past t*.
@example(sizes=[1, 129, 641], levels=2, ratio=0.21875, seed=677, copies=0)
@given(
    sizes=st.lists(st.integers(1, 700), min_size=1, max_size=5),
    levels=st.integers(2, 50),
    ratio=st.floats(0.0, 0.99),
    seed=st.integers(0, 10_000),
    copies=st.integers(0, 2),
)
def test_property_counts_topk_and_reference(sizes, levels, ratio, seed, copies):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, n in enumerate(sizes):  # few distinct levels make ties common
        state[f"layers.{i}.blocks.0.mlp.fc1.weight"] = torch.randint(-levels, levels + 1, (n,), generator=g).float() / levels
    for c in range(copies):  # identical layers tie on every run head, across layers
        state[f"layers.{len(sizes) + c}.blocks.0.mlp.fc1.weight"] = state["layers.0.blocks.0.mlp.fc1.weight"].clone()
    sizes = [w.numel() for w in state.values()]
    plan = dimap_fast.plan(state)
    masks = plan.masks(ratio)
    total = sum(sizes)
    assert total - sum(int(m.sum()) for m in masks.values()) == int(ratio * total + 0.5)
    for name, mask in masks.items():  # inside a layer the kept set is the top by magnitude
        mags = state[name].abs()
        if mask.any() and (~mask).any():
            assert mags[mask].min() >= mags[~mask].max()
    assert_same(masks, Reference(state).masks(ratio))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), r1=st.floats(0.0, 0.98), r2=st.floats(0.0, 0.98))
def test_property_monotone_in_ratio(seed, r1, r2):
    lo, hi = sorted([r1, r2])
    state = make_state(SHAPES, seed=seed)
    state["layers.1.blocks.0.mlp.fc1.weight"] = torch.round(state["layers.1.blocks.0.mlp.fc1.weight"] * 4) / 4
    plan = dimap_fast.plan(state)
    a, b = plan.masks(lo), plan.masks(hi)
    for name in a:
        assert not (b[name] & ~a[name]).any(), "a weight pruned at a lower ratio came back"
