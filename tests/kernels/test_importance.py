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
    ref = module_scores_reference(mags, offsets, **kw)
    assert got.dtype == torch.float64 and got.shape == mags.shape
    assert not torch.isnan(got).any()
    assert torch.equal(got, ref)  # one summation order: bit for bit, not approximately
    # Selection depends on scores never rising along ranks.
    offs = offsets.tolist()
    for a, b in zip(offs[:-1], offs[1:]):
        assert bool((got[a + 1:b] <= got[a:b - 1]).all())
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", [(64, 64), (4, 2)])
def test_matches_reference_ragged(dtype, order, device):
    mags = sorted_mags(SIZES, dtype, device=device)
    check_scores(mags, offsets_of(SIZES, device), order=order)


def test_ties_zero_tail_and_all_zero_layer(device):
    sizes = [7, 33, 1, 50, 2]
    mags = sorted_mags(sizes, levels=4, zero_tail=5, zero_layers=(1, 2), device=device)
    got = check_scores(mags, offsets_of(sizes, device), order=(4, 4))
    offs = offsets_of(sizes).tolist()
    assert bool((got[offs[1]:offs[3]] == 0).all())  # all-zero layers score 0, not NaN
    assert bool((got[offs[0]] == 1) & (got[offs[3]] == 1))  # a non-zero layer's rank 0 scores 1


def test_many_groups_and_top_chunks(device):
    # 600 / (4 x 2) = 75 groups in the first layer: several chunks of the layer-tops pass.
    sizes = [600, 3, 97]
    mags = sorted_mags(sizes, torch.float16, seed=3, device=device)
    check_scores(mags, offsets_of(sizes, device), order=(4, 2))


def test_the_cpu_plan_sums_in_the_same_order(device):
    from dimap_fast.engine import scores
    from dimap_fast.engine.scores import LayerState

    assert (scores.RUN, scores.GROUP) == (importance.RUN, importance.GROUP)  # one home: the kernels'
    n = 2 * importance.RUN * importance.GROUP + 77  # three groups
    mags = sorted_mags([n], seed=5, device=device)
    got = module_scores(mags, offsets_of([n], device))
    state = LayerState(-mags.cpu().numpy(), "dimap")
    assert torch.equal(got.cpu(), torch.from_numpy(state.keys(0, n)))


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
    order=st.sampled_from([(4, 2), (8, 4), (64, 64)]),
    seed=st.integers(0, 2**16),
)
def test_property(sizes, levels, dtype, order, seed, device):
    mags = sorted_mags(sizes, dtype, levels=levels, seed=seed, device=device)
    check_scores(mags, offsets_of(sizes, device), order=order)
