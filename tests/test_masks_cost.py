"""The masks() cost model's corrections to what it records: gathers charged as the sectors they
read, and the scoring launchers recorded at their GPU tiles."""

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
