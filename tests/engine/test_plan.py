"""plan.py: a Plan's answers agree with each other at every ratio (cutoffs, keep counts, masks,
sparsity, prune_), and compute_masks is plan().masks()."""

import math

import pytest
import torch

import dimap_fast
from dimap_fast.engine.plan import Cutoff, layer_mask
from statedicts import make_state

SHAPES = {"layers.0.blocks.0.attn.qkv.weight": (48, 16), "layers.0.blocks.0.attn.proj.weight": (16, 16),
          "layers.0.blocks.0.mlp.fc1.weight": (64, 16), "layers.0.blocks.0.mlp.fc2.weight": (16, 64)}


@pytest.mark.parametrize("method", ["dimap", "global", "uniform"])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75])
def test_masks_cutoffs_and_sparsity_agree(method, ratio):
    state = make_state(SHAPES, seed=1)
    p = dimap_fast.plan(state, method=method)
    masks, cuts = p.masks(ratio), p.cutoffs(ratio)
    assert masks.keys() == state.keys() == cuts.keys()
    removed = sum(int((~m).sum()) for m in masks.values())
    assert removed == round(ratio * sum(t.numel() for t in state.values())) or method != "global"
    for name, mask in masks.items():
        cut = cuts[name]
        assert int(mask.sum()) == cut.keep and cut.numel == mask.numel()
        kept = state[name].abs()[mask]
        assert kept.numel() == 0 and cut.magnitude == math.inf or float(kept.min()) == cut.magnitude
        assert torch.equal(layer_mask(state[name], cut), mask)
    for name, row in p.sparsity(ratio)["layers"].items():
        assert row == pytest.approx(1 - int(masks[name].sum()) / masks[name].numel())


def test_keep_counts_fall_as_the_ratio_rises():
    p = dimap_fast.plan(make_state(SHAPES, seed=2))
    counts = p.keep_counts_many([0.1, 0.4, 0.7, 0.9])
    assert (counts[1:] <= counts[:-1]).all() and counts.shape == (4, len(SHAPES))


def test_compute_masks_is_plan_masks_and_prune_zeroes_the_same_weights():
    state = make_state(SHAPES, seed=3)
    want = dimap_fast.plan(state).masks(0.5)
    got = dimap_fast.compute_masks(state, 0.5)
    assert all(torch.equal(got[k], want[k]) for k in want)
    copy = {k: v.clone() for k, v in state.items()}
    dimap_fast.plan(copy).prune_(0.5)
    assert all(torch.equal(copy[k], state[k] * want[k]) for k in want)


def test_a_cutoff_that_keeps_nothing_masks_everything():
    w = torch.randn(8, 8)
    assert not layer_mask(w, Cutoff(math.inf, 0, w.numel())).any()
