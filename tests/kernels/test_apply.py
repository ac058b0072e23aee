import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import offsets_of

from dimap_fast.kernels.apply import apply_cutoffs, apply_cutoffs_reference
from dimap_fast.kernels.importance import module_scores
from dimap_fast.kernels.select import select_keep_counts

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tied_weights(sizes, dtype=torch.float32, levels=4, seed=0, device="cpu"):
    """Flat weights in original (unsorted) order, both signs, with many equal magnitudes."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    w = torch.randint(-levels, levels + 1, (n,), generator=g).to(torch.float32) / levels
    return w.to(dtype).to(device)


def check_apply(w, offsets, cut, keep, **kw):
    ref_w, ref_mask, ref_kept = apply_cutoffs_reference(w, offsets, cut, keep)
    w_in = w.clone()
    mask, kept = apply_cutoffs(w_in, offsets, cut, keep, **kw)
    assert mask.dtype == torch.bool and kept.dtype == torch.int64
    assert torch.equal(mask, ref_mask)
    assert torch.equal(kept, ref_kept)
    assert torch.equal(w_in, ref_w)  # pruned in place
    return mask, kept


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [None, 8])
def test_ties_split_by_flat_index(dtype, block_size, device):
    sizes = [1, 2, 7, 33, 300, 5]
    w = tied_weights(sizes, dtype, device=device)
    offsets = offsets_of(sizes, device)
    cut = torch.tensor([0.25, 0.5, 0.75, 0.5, 0.25, 1.0], device=device)
    # Below, inside and above each layer's [count > cut, count >= cut] range.
    keep = torch.tensor([0, 1, 3, 12, 200, 5], device=device)
    check_apply(w, offsets, cut, keep, block_size=block_size)


def test_keep_below_strict_count_keeps_all_above_cut(device):
    sizes = [10, 20]
    w = tied_weights(sizes, device=device)
    offsets = offsets_of(sizes, device)
    mask, kept = check_apply(w, offsets, torch.tensor([0.0, 0.5], device=device),
                             torch.tensor([0, 0], device=device), block_size=4)
    assert bool(kept[0] == (w[:10] != 0).sum())


def test_zero_cut_all_zero_layer_and_inf_cut(device):
    sizes = [6, 9, 4]
    w = tied_weights(sizes, device=device)
    w[6:15] = 0
    offsets = offsets_of(sizes, device)
    cut = torch.tensor([float("inf"), 0.0, 0.0], device=device)
    check_apply(w, offsets, cut, torch.tensor([0, 4, 4], device=device), block_size=4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pipeline_keeps_exactly_the_selected_counts(dtype, device):
    # scores -> keep counts -> cutoffs -> masks: the kernel must keep exactly what was chosen.
    sizes = [7, 33, 120, 2]
    w = tied_weights(sizes, dtype, levels=6, seed=5, device=device)
    offsets = offsets_of(sizes, device)
    offs = offsets.tolist()
    # Ties in magnitude ordered by flat index: the order apply_cutoffs breaks them in.
    order = [torch.sort(w[a:b].abs().float(), descending=True, stable=True)
             for a, b in zip(offs[:-1], offs[1:])]
    mags = torch.cat([o.values for o in order]).to(dtype)
    counts = select_keep_counts(module_scores(mags, offsets, order=(4, 2)), offsets,
                                torch.tensor([0, 40, 81, sum(sizes)], device=device))
    for row in counts.tolist():
        cut = torch.tensor([o.values[c - 1] if c else float("inf") for o, c in zip(order, row)],
                           dtype=torch.float32, device=device)
        mask, kept = check_apply(w, offsets, cut, torch.tensor(row, device=device), block_size=16)
        assert kept.tolist() == row
        want = torch.zeros_like(mask)
        for (a, _b), o, c in zip(zip(offs[:-1], offs[1:]), order, row):
            want[a + o.indices[:c]] = True
        assert torch.equal(mask, want)


def test_mask_only_leaves_the_weights(device):
    from dimap_fast.kernels.apply import cut_from_tables, default_tables

    sizes = [7, 33, 120, 2]
    w = tied_weights(sizes, levels=6, seed=6, device=device)
    before = w.clone()
    cut = torch.tensor([0.5, 0.3, 0.0, float("inf")], device=device)
    keep = torch.tensor([3, 10, 100, 0], device=device)
    _, want, want_kept = apply_cutoffs_reference(w, offsets_of(sizes, device), cut, keep)
    mask, kept = cut_from_tables(w, default_tables(sizes, device), cut, keep, zero=False)
    assert torch.equal(w, before)
    assert torch.equal(mask, want) and torch.equal(kept, want_kept)


@pytest.mark.parametrize("extra", [0, 1, 95, 150, 207])
def test_tie_quota_ending_in_a_late_block_of_a_long_layer(extra, device):
    # 125 blocks of 8: the layer's quota scan runs over several chunks before its ties run out.
    sizes = [40, 1000, 7]
    w = tied_weights(sizes, levels=4, seed=9, device=device)
    mags = w.abs()
    above = int((mags[40:1040] > 0.25).sum())
    assert int((mags[40:1040] == 0.25).sum()) > extra
    cut = torch.tensor([0.5, 0.25, 0.0], device=device)
    keep = torch.tensor([int((mags[:40] > 0.5).sum()) + 3, above + extra, 7], device=device)
    mask, kept = check_apply(w, offsets_of(sizes, device), cut, keep, block_size=8)
    assert kept.tolist() == keep.tolist()


def test_masks_without_counts_are_the_same_masks(device):
    from dimap_fast.kernels.apply import cut_from_tables, default_tables

    sizes = [7, 33, 120, 2]
    w = tied_weights(sizes, levels=3, seed=7, device=device)
    cut = torch.tensor([1 / 3, 2 / 3, 1 / 3, 1.0], device=device)
    keep = torch.tensor([4, 9, 60, 1], device=device)
    _, want, _ = apply_cutoffs_reference(w, offsets_of(sizes, device), cut, keep)
    mask, kept = cut_from_tables(w, default_tables(sizes, device), cut, keep, zero=False, count=False)
    assert kept is None and torch.equal(mask, want)


def test_layers_whose_cut_splits_no_ties_are_not_counted(device):
    from dimap_fast.kernels.apply import cut_from_tables, default_tables

    sizes = [40, 300, 7]
    w = tied_weights(sizes, levels=4, seed=3, device=device)
    offs = offsets_of(sizes, device)
    cut = torch.tensor([0.5, 0.25, 0.75], device=device)
    mags = w.abs().cpu()
    ge = [int((mags[a:b] >= c).sum()) for a, b, c in zip(offs[:-1].tolist(), offs[1:].tolist(), cut.tolist())]
    keep = torch.tensor([ge[0], ge[1] - 5, ge[2]], device=device)  # the middle one splits its ties
    split = torch.tensor([0, 1, 0], dtype=torch.int32, device=device)
    _, want, _ = apply_cutoffs_reference(w, offs, cut, keep)
    mask, kept = cut_from_tables(w, default_tables(sizes, device), cut, keep, zero=False, split=split)
    assert torch.equal(mask, want) and kept.tolist() == keep.tolist()


def test_vector_loads_only_where_every_layer_and_block_starts_at_a_multiple_of_16():
    from dimap_fast.kernels.apply import ApplyTables

    assert ApplyTables([16, 48, 2048], "cpu", 256).aligned
    assert not ApplyTables([16, 8, 16], "cpu", 256).aligned
    assert not ApplyTables([16, 48], "cpu", 8).aligned


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(w=torch.ones(4, dtype=torch.int32)), "w must be"),
        (dict(w=torch.ones(8)[::2]), "contiguous"),
        (dict(cut=torch.ones(2)), "one entry per layer"),
        (dict(cut=torch.ones(1, dtype=torch.float64)), "cut must be float32"),
        (dict(keep=torch.ones(1, dtype=torch.int32)), "keep must be int64"),
    ],
)
def test_validation(kw, msg, device):
    args = dict(w=torch.ones(4), offsets=torch.tensor([0, 4]), cut=torch.ones(1),
                keep=torch.ones(1, dtype=torch.int64))
    args.update(kw)
    args = {k: v.to(device) for k, v in args.items()}
    with pytest.raises(ValueError, match=msg):
        apply_cutoffs(**args)


@settings(max_examples=12, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    levels=st.integers(1, 4),
    block=st.sampled_from([4, 16]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_property(sizes, dtype, levels, block, seed, data, device):
    w = tied_weights(sizes, dtype, levels=levels, seed=seed, device=device)
    grid = [i / levels for i in range(levels + 2)]
    cut = torch.tensor([data.draw(st.sampled_from(grid)) for _ in sizes], dtype=torch.float32,
                       device=device)
    keep = torch.tensor([data.draw(st.integers(0, n + 1)) for n in sizes], dtype=torch.int64,
                        device=device)
    check_apply(w, offsets_of(sizes, device), cut, keep, block_size=block)
