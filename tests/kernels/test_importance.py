import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import SIZES, offsets_of, sorted_mags

from dimap_fast.kernels import importance
from dimap_fast.kernels.importance import module_scores, module_scores_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_scores(mags, offsets, **kw):
    got = module_scores(mags, offsets, **kw)
    ref = module_scores_reference(mags, offsets)
    assert got.dtype == torch.float64 and got.shape == mags.shape
    assert not torch.isnan(got).any()
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)
    # Exact, not approximate: selection depends on scores never rising along ranks.
    offs = offsets.tolist()
    for a, b in zip(offs[:-1], offs[1:]):
        assert bool((got[a + 1:b] <= got[a:b - 1]).all())
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [None, 16])
def test_matches_reference_ragged(dtype, block_size, device):
    mags = sorted_mags(SIZES, dtype, device=device)
    check_scores(mags, offsets_of(SIZES, device), block_size=block_size)


def test_ties_zero_tail_and_all_zero_layer(device):
    sizes = [7, 33, 1, 50, 2]
    mags = sorted_mags(sizes, levels=4, zero_tail=5, zero_layers=(1, 2), device=device)
    got = check_scores(mags, offsets_of(sizes, device), block_size=8)
    offs = offsets_of(sizes).tolist()
    assert bool((got[offs[1]:offs[3]] == 0).all())  # all-zero layers score 0, not NaN
    assert bool((got[offs[0]] == 1) & (got[offs[3]] == 1))  # a non-zero layer's rank 0 scores 1


def test_many_blocks_and_carry_chunks(device):
    # 600 / 4 = 150 blocks: several carry chunks (16 blocks each under the interpreter).
    sizes = [600, 3, 97]
    mags = sorted_mags(sizes, torch.float16, seed=3, device=device)
    check_scores(mags, offsets_of(sizes, device), block_size=4)


def test_cummax_path(monkeypatch, device):
    # The GPU path's in-block running max, which the interpreter otherwise skips.
    monkeypatch.setattr(importance, "_FORCE_CUMMAX", True)
    sizes = [7, 40, 1]
    mags = sorted_mags(sizes, levels=5, zero_tail=2, device=device)
    check_scores(mags, offsets_of(sizes, device), block_size=16)


def test_single_element_layers(device):
    mags = torch.tensor([3.0, 0.0, 1e-20], device=device)
    got = check_scores(mags, offsets_of([1, 1, 1], device))
    assert got.tolist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "mags, offsets, msg",
    [
        (torch.ones(4, dtype=torch.float64), torch.tensor([0, 4]), "mags must be"),
        (torch.ones(2, 2), torch.tensor([0, 4]), "1-D"),
        (torch.ones(4), torch.tensor([0, 4], dtype=torch.int32), "offsets must be int64"),
        (torch.ones(4), torch.tensor([0, 3]), "end at the flat length"),
        (torch.ones(4), torch.tensor([0, 2, 2, 4]), "strictly increasing"),
        (torch.ones(4), torch.tensor([0]), "length L\\+1"),
    ],
)
def test_validation(mags, offsets, msg, device):
    with pytest.raises(ValueError, match=msg):
        module_scores(mags.to(device), offsets.to(device))
    with pytest.raises(ValueError, match=msg):
        module_scores_reference(mags, offsets)


@settings(max_examples=12, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    levels=st.sampled_from([0, 1, 3]),
    dtype=st.sampled_from(DTYPES),
    block=st.sampled_from([4, 8, 32]),
    seed=st.integers(0, 2**16),
)
def test_property(sizes, levels, dtype, block, seed, device):
    mags = sorted_mags(sizes, dtype, levels=levels, seed=seed, device=device)
    check_scores(mags, offsets_of(sizes, device), block_size=block)
