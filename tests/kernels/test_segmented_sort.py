import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import offsets_of

from dimap_fast.kernels import segmented_sort as ss
from dimap_fast.kernels.segmented_sort import segmented_sort_descending, segmented_sort_descending_reference

CHUNK = 16  # several chunks per segment with few elements (the interpreter pays per program)


def check_sort(values, sizes, device, chunk=CHUNK):
    offsets = offsets_of(sizes)
    got = segmented_sort_descending(values.to(device), offsets.to(device), chunk=chunk)
    ref = segmented_sort_descending_reference(values, offsets)
    assert got.dtype == torch.float32 and got.device.type == device.type
    assert torch.equal(got.cpu().view(torch.int32), ref.view(torch.int32))  # bit for bit, NaN too
    return got.cpu()


def test_special_values_and_ragged_segments(device):
    sizes = [0, 1, 2, 5, 16, 17, 33, 0, 64, 3, 1]
    g = torch.Generator().manual_seed(3)
    v = torch.randn(sum(sizes), generator=g) * 10 ** torch.empty(sum(sizes)).uniform_(-40, 30, generator=g)
    specials = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, -1e-45, 3.4e38]
    v[8:8 + len(specials)] = torch.tensor(specials)  # in the 16-long segment (8:24)
    v[40:60] = 0.25  # ties across chunks
    v[60:70] = -0.25
    v[100:] = 0.0
    got = check_sort(v, sizes, device)
    seg = got[8:24]  # the 16-long segment: NaN first, then +inf from either sign, as torch sorts
    assert seg[0].isnan() and seg[1] == seg[2] == float("inf")


def test_wide_chunks(device):
    # One segment filling a chunk, one crossing into a second (the GPU's 4096-wide chunk takes
    # minutes in the interpreter, whose tl.sort runs a Python loop per element: 256 stands in).
    g = torch.Generator().manual_seed(5)
    sizes = [256, 263]
    v = (torch.randint(-50, 50, (sum(sizes),), generator=g) / 7).float()  # many ties
    check_sort(v, sizes, device, chunk=256)


def test_every_digit_of_every_pass_moves(device):
    # Keys that differ only in one pass's digit: each pass must order them on its own.
    bits = torch.tensor([1 << s for s in range(0, 31, 1)] + [(1 << 31) - 1, 0, 3 << 11, 5 << 22],
                        dtype=torch.int32)
    v = bits.view(torch.float32)
    v = torch.cat([v, -v.flip(0)])
    check_sort(v, [v.numel()], device)
    check_sort(v, [7, v.numel() - 7], device)


def test_empty_and_validation(device):
    got = segmented_sort_descending(torch.zeros(0, device=device), torch.tensor([0, 0], device=device))
    assert got.numel() == 0
    for values, offsets, msg in [
        (torch.ones(3, dtype=torch.float64), torch.tensor([0, 3]), "values must be"),
        (torch.ones(3), torch.tensor([0, 2]), "offsets must rise"),
        (torch.ones(3), torch.tensor([0, 2, 1, 3]), "offsets must rise"),
        (torch.ones(3), torch.tensor([0, 3], dtype=torch.int32), "offsets must be"),
    ]:
        with pytest.raises(ValueError, match=msg):
            segmented_sort_descending(values.to(device), offsets.to(device))
        with pytest.raises(ValueError, match=msg):
            segmented_sort_descending_reference(values, offsets)
    with pytest.raises(ValueError, match="chunk"):
        segmented_sort_descending(torch.ones(3, device=device), torch.tensor([0, 3], device=device), chunk=3)


@settings(max_examples=6, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4), levels=st.sampled_from([0, 2, 9]),
       seed=st.integers(0, 2**16))
def test_property(sizes, levels, seed, device):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    v = torch.randn(n, generator=g)
    if levels:
        v = torch.randint(-levels, levels, (n,), generator=g).float()
    check_sort(v, sizes, device)


def test_launch_configs_cover_every_pass():
    names = [c.name for c in ss.launch_configs()]
    passes = len(range(0, ss.KEY_BITS, ss.RADIX_BITS))
    assert len(names) == 1 + 2 * passes and len(set(names)) == len(names)
