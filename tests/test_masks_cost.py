"""The masks() cost model's corrections to what it records: gathers charged as the sectors they
read, the scoring launchers recorded at their GPU tiles, and each torch.sort charged by the path
ATen takes at the real model's sizes."""

import pytest
import torch

from dimap_fast.cost_model import masks_cost
from dimap_fast.cost_model.baselines import count_bytes


def test_a_gather_is_charged_the_sectors_it_reads():
    src, idx = torch.zeros(1 << 16), torch.tensor([0, 5, 9])
    with count_bytes(real=True) as ops, masks_cost._Gathers() as gathers:
        src[idx]
    # the index (3 int64), a sector per gathered element, the output (3 fp32)
    assert ops.bytes - gathers.excess == 3 * 8 + 3 * 32 + 3 * 4


def test_the_scoring_launchers_pick_their_gpu_tiles_inside():
    from dimap_fast.kernels import apply, importance, select

    before = apply.default_tables([10], "cpu").block
    with masks_cost._gpu_tiles():
        assert apply.default_tables([10], "cpu").block == apply._GPU_BLOCK
        assert not select.interpreting(select._keep_counts) and not importance.interpreting(importance._layer_tops)
    assert apply.default_tables([10], "cpu").block == before


def test_each_torch_sort_path_is_charged_what_it_moves():
    from dimap_fast.cost_model.torch_sort import sort_cost

    # one segment: n int64 indices filled, then (fp32, int64) pairs: a histogram read of the
    # keys and 4 passes of 8 bits, each reading and writing 12 bytes
    assert sort_cost(1, 1 << 20) == ((1 << 20) * (8 + 4 + 4 * 2 * 12), 1 + 2 + 4, "radix per segment")
    # a million keys a row or more: a radix sort per row even in a batch
    assert sort_cost(3, 1_000_000)[1:] == (1 + 3 * 6, "radix per segment")
    # 2-127 rows: (index, row) int2 filled 8, (fp32, int2) pairs 4 + 4 * 24, the int2 pairs as
    # int64 keys on 5 row bits (one pass: 8 + 2 * 8), then 8 read + 4 gathered + 8 + 4 written
    nbytes, launches, path = sort_cost(18, 786432)
    assert path == "full sort" and launches == 1 + 6 + 3 + 1
    assert nbytes == 18 * 786432 * (8 + 100 + 24 + 24)
    # rows of 4096 or fewer: copied, indices filled, sorted in place in shared memory
    assert sort_cost(4, 4096) == (4 * 4096 * (8 + 8 + 24), 3, "in-place")
    assert sort_cost(200, 5000)[2] == "segmented" and sort_cost(0, 5000)[0] == 0


def test_a_sort_is_recorded_with_its_rows_and_charged_at_the_real_size():
    with count_bytes(real=True) as ops:
        torch.sort(torch.zeros(7, 3), stable=True, dim=0)
        torch.sort(torch.zeros(2, 48), dim=1, descending=True)
    assert ops.sorts == [(3, 7, 4), (2, 48, 4)]
    # Swin-B's stand-in of width 8: a row of 48 is 48 * (128 / 8)^2 = 12288 weights at width 128
    from dimap_fast.cost_model.hardware import H100
    from dimap_fast.cost_model.torch_sort import sort_cost

    run = lambda n: masks_cost.MasksRun(1000, 0, 0.0, 0, [], [(2, n, 4)])  # noqa: E731
    e = masks_cost.combine("swin_b", run(12), run(48), [], H100)
    nbytes, launches, path = sort_cost(2, 12288)
    assert (e.sort_bytes, e.sort_launches, e.sort_paths) == (nbytes, launches, f"{path} 100%")
    assert e.seconds(H100) == pytest.approx(launches * H100.launch_s + nbytes / H100.copy_bytes_per_s)


def test_stand_ins_sorting_different_rows_are_refused():
    from dimap_fast.cost_model.hardware import H100

    small = masks_cost.MasksRun(1000, 0, 0.0, 0, [], [(2, 12, 4)])
    large = masks_cost.MasksRun(4000, 0, 0.0, 0, [], [(3, 48, 4)])
    with pytest.raises(RuntimeError, match=r"sorts \[2\] vs .*sorts \[3\]"):
        masks_cost.combine("swin_b", small, large, [], H100)
