import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import SIZES, offsets_of, sorted_mags

from dimap_fast.kernels.importance import module_scores_reference
from dimap_fast.kernels.select import select_keep_counts, select_keep_counts_reference


def scores_of(sizes, device="cpu", **kw):
    mags = sorted_mags(sizes, device=device, **kw)
    return module_scores_reference(mags, offsets_of(sizes, device))


def check_counts(scores, offsets, keep, groups=None):
    got = select_keep_counts(scores, offsets, keep, groups=groups)
    ref = select_keep_counts_reference(scores, offsets, keep, groups=groups)
    assert got.dtype == torch.int64 and got.shape == (keep.shape[0], offsets.numel() - 1)
    assert torch.equal(got.cpu(), ref.cpu())  # integers: equal, not close
    bounds = [0, offsets.numel() - 1] if groups is None else groups
    per_group = torch.stack([got[:, a:b].sum(1) for a, b in zip(bounds[:-1], bounds[1:])], 1)
    assert torch.equal(per_group.cpu(), keep.reshape(keep.shape[0], -1).cpu())
    sizes = (offsets[1:] - offsets[:-1]).cpu()
    assert bool(((got.cpu() >= 0) & (got.cpu() <= sizes)).all())
    return got


def keeps(total, *middle):
    return torch.tensor([0, 1, *middle, total - 1, total], dtype=torch.int64)


@pytest.mark.parametrize("levels", [0, 3])
def test_ragged_all_ratios(levels, device):
    s = scores_of(SIZES, device, levels=levels, zero_tail=4)
    total = s.numel()
    keep = keeps(total, 2, 17, total // 3, total // 2).to(device)
    check_counts(s, offsets_of(SIZES, device), keep)


def test_ties_across_layers_go_to_earlier_layers_first(device):
    # Identical layers: every score value occurs once per layer, so every cut is a tie and
    # the lower layer index must win each time.
    sizes = [9, 9, 9]
    mags = sorted_mags([9], levels=4).repeat(3).to(device)
    s = module_scores_reference(mags, offsets_of(sizes, device))
    got = check_counts(s, offsets_of(sizes, device), torch.arange(28, device=device))
    assert bool((got[:, 0] >= got[:, 1]).all() & (got[:, 1] >= got[:, 2]).all())


def test_zero_scores_and_all_zero_layer(device):
    sizes = [5, 4, 6, 1]
    s = scores_of(sizes, device, levels=2, zero_tail=2, zero_layers=(1,))
    check_counts(s, offsets_of(sizes, device), torch.arange(s.numel() + 1, device=device))


def test_layer_chunks(device):
    # More layers than one search chunk (8 under the interpreter): tie hand-out carries across chunks.
    sizes = [3, 1, 8, 2, 5, 7, 1, 4, 2, 6, 3, 1]
    s = scores_of(sizes, device, levels=3)
    total = s.numel()
    keep = torch.tensor([0, 1, 2, 3, 5, 8, 11, 13, 16, 20, 26, 27, total - 1, total], device=device)
    check_counts(s, offsets_of(sizes, device), keep)


def test_groups_select_in_one_launch(device):
    # Three modules of 2, 5 and 3 layers, several ratios: each group gets its own threshold.
    sizes = [3, 9, 1, 8, 2, 5, 7, 1, 4, 6]
    groups = [0, 2, 7, 10]
    s = scores_of(sizes, device, levels=4, zero_tail=1)
    offs = offsets_of(sizes)
    totals = [int(offs[b] - offs[a]) for a, b in zip(groups[:-1], groups[1:])]
    keep = torch.tensor([[0, 0, 0], [1, 2, 3], [totals[0] // 2, totals[1] // 3, totals[2] - 1], totals],
                        dtype=torch.int64, device=device)
    check_counts(s, offsets_of(sizes, device), keep, groups=groups)


def test_many_ratios_one_layer(device):
    s = scores_of([1000], device, levels=50)
    check_counts(s, offsets_of([1000], device), torch.tensor([0, 3, 499, 500, 999, 1000]))


def test_no_ratios(device):
    s = scores_of([3, 4], device)
    got = select_keep_counts(s, offsets_of([3, 4], device), torch.zeros(0, dtype=torch.int64))
    assert got.shape == (0, 2)


@pytest.mark.parametrize(
    "scores, keep, msg",
    [
        (torch.ones(4), torch.tensor([1]), "scores must be float64"),
        (torch.ones(4, dtype=torch.float64), torch.tensor([5]), "keep totals"),
        (torch.ones(4, dtype=torch.float64), torch.tensor([-1]), "keep totals"),
        (torch.ones(4, dtype=torch.float64), torch.tensor([1], dtype=torch.int32), "keep must be"),
        (torch.ones(4, dtype=torch.float64), torch.tensor([[1, 1]]), "keep must be"),
    ],
)
def test_validation(scores, keep, msg, device):
    offsets = torch.tensor([0, 4])
    with pytest.raises(ValueError, match=msg):
        select_keep_counts(scores.to(device), offsets.to(device), keep.to(device))
    with pytest.raises(ValueError, match=msg):
        select_keep_counts_reference(scores, offsets, keep)


@settings(max_examples=10, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    levels=st.sampled_from([0, 1, 2, 5]),
    zero_tail=st.integers(0, 3),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_property(sizes, levels, zero_tail, seed, data, device):
    s = scores_of(sizes, device, levels=levels, zero_tail=zero_tail, seed=seed)
    keep = data.draw(st.lists(st.integers(0, s.numel()), min_size=1, max_size=6))
    check_counts(s, offsets_of(sizes, device), torch.tensor(keep, dtype=torch.int64, device=device))


def test_cuts_come_with_the_counts(device):
    # The GPU plan's launch: the same counts, and each layer's last kept magnitude and key.
    from dimap_fast.kernels.select import SelectTables, cuts_from_tables

    sizes = [3, 9, 1, 8, 2, 5]
    groups = [0, 2, 6]
    mags = sorted_mags(sizes, device=device, levels=4).float()
    s = module_scores_reference(mags, offsets_of(sizes, device))
    offs = offsets_of(sizes)
    totals = [int(offs[b] - offs[a]) for a, b in zip(groups[:-1], groups[1:])]
    keep = torch.tensor([[0, 0], [1, 3], [totals[0] // 2, totals[1] - 1], totals], device=device)
    counts, cut, host, split = cuts_from_tables(s, mags, SelectTables(sizes, groups, device), keep)
    assert torch.equal(counts.cpu(), select_keep_counts_reference(s, offs, keep.cpu(), groups=groups))
    at = (offs[:-1] + (counts.cpu() - 1).clamp_min(0))
    kept = counts.cpu() > 0
    want_cut = torch.where(kept, mags.cpu()[at], torch.tensor(float("inf")))
    assert torch.equal(cut.cpu(), want_cut)
    assert torch.equal(host[0].cpu(), counts.cpu().double()) and torch.equal(host[1].cpu(), want_cut.double())
    assert torch.equal(host[2].cpu()[kept], s.cpu()[at][kept])
    size = offs[1:] - offs[:-1]
    inside = kept & (counts.cpu() < size) & (mags.cpu()[(at + 1).clamp_max(mags.numel() - 1)] == want_cut)
    assert torch.equal(split.cpu(), inside.int())
