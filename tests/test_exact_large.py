"""Swin-S and Swin-B: the engine's masks equal the literal Eq. 10 reference (random init, seed 0)."""

import pytest
import timm
import torch
from reference import Reference

import dimap_fast


@pytest.mark.parametrize("name", ["swin_small_patch4_window7_224", "swin_base_patch4_window7_224"])
def test_larger_swins_equal_reference(name):
    torch.manual_seed(0)
    state = timm.create_model(name).state_dict()
    ref = Reference(state, "dimap")
    plan = dimap_fast.plan(state)
    for ratio in (0.35, 0.55):
        expected, got = ref.masks(ratio), plan.masks(ratio)
        assert sorted(got) == sorted(expected)
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"{name} r={ratio}: {key}"
