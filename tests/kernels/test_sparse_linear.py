import pytest
import torch

from dimap_fast.kernels import sparse_linear
from dimap_fast.kernels.sparse_linear import (
    BlockSparseWeight,
    block_sparse_linear,
    block_sparse_linear_reference,
    pack_block_sparse,
    tile_sparsity,
    unpack_block_sparse,
)

from tolerances import DTYPE_CASES, DTYPE_IDS, assert_close, matmul_precision


def tiled_weight(out_f, in_f, block, keep, seed=0, dtype=torch.float32, device="cpu"):
    """Random weight whose tile (r, c) is kept where ``keep[r][c]`` (a bool grid) is True."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    keep = torch.as_tensor(keep, dtype=torch.bool)
    full = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)[:out_f, :in_f]
    return (w * full).to(dtype).to(device)


def random_keep(rows, cols, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, cols, generator=g) < density


def check(x, w, block, bias=None):
    packed = pack_block_sparse(w, block)
    y = block_sparse_linear(x, packed, bias)
    with matmul_precision("ieee"):  # the reference is exact float32, whatever the kernel ran
        ref = block_sparse_linear_reference(x, packed, bias)
    assert y.shape == ref.shape and y.dtype == x.dtype and y.device == x.device
    assert_close(y, ref)
    return y


def check_config(x, w, block, bias, config):
    """One forced launch config (BM, ROWS, warps, stages) against the float32 reference."""
    packed = pack_block_sparse(w, block)
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    sparse_linear._launch(x, packed, bias, y, config)
    with matmul_precision("ieee"):
        ref = block_sparse_linear_reference(x, packed, bias)
    assert_close(y, ref)
    return y


# 7 tile-rows, so no ROWS of 2, 3 or 4 divides them: each row keeps other columns than its
# neighbours, the empty ones (1, 4, 6) fall first, mid and last in a program's group, and the
# last kept tile is the last of col_idx (the one-ahead column load runs past it).
ROW_PATTERN = [[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 1], [0, 0, 0], [0, 0, 1], [0, 0, 0]]


def test_pack_unpack_roundtrip_and_format():
    keep = [[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0], [1, 0, 0]]
    w = tiled_weight(70, 45, 16, keep)  # 5 x 3 tiles, the last row and column partial
    p = pack_block_sparse(w, 16)
    assert isinstance(p, BlockSparseWeight)
    assert p.grid == (5, 3) and p.tiles.shape == (7, 16, 16)
    assert p.row_ptr.tolist() == [0, 2, 2, 5, 6, 7]
    assert p.col_idx.tolist() == [0, 2, 0, 1, 2, 1, 0]
    assert p.density == pytest.approx(7 / 15)
    edge = torch.zeros(16, 16)  # tile (0, 2): stored transposed, zero-padded past column 45
    edge[:13] = w[0:16, 32:45].T
    assert torch.equal(p.tiles[1], edge)
    assert torch.equal(unpack_block_sparse(p), w)
    assert tile_sparsity(w, 16) == pytest.approx(8 / 15)


@pytest.mark.parametrize("block", [16, 32, 64])
def test_pack_all_zero_and_dense(block):
    z = pack_block_sparse(torch.zeros(40, 70), block)
    assert z.tiles.shape[0] == 0 and z.density == 0.0
    assert torch.equal(unpack_block_sparse(z), torch.zeros(40, 70))
    d = torch.randn(40, 70)
    assert pack_block_sparse(d, block).density == 1.0


@pytest.mark.parametrize("dtype,precision", DTYPE_CASES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block", [16, 32])
def test_matches_reference_mixed_rows(dtype, precision, block, device):
    # Tile-rows fully kept, fully pruned and mixed; partial edge tiles on both axes; two row blocks.
    keep = [[1, 1, 1], [0, 0, 0], [1, 0, 1], [0, 1, 0]]
    w = tiled_weight(4 * block - 5, 3 * block - 7, block, keep, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(70, w.shape[1], generator=g).to(device, dtype)
    bias = torch.randn(w.shape[0], generator=g).to(device, dtype)
    with matmul_precision(precision):
        y = check(x, w, block, bias)
    assert torch.equal(y[:, block:2 * block], bias[block:2 * block].expand(70, -1))  # pruned row


@pytest.mark.parametrize("dtype,precision", DTYPE_CASES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_several_tile_rows_per_program(rows, block, dtype, precision, device):
    # Partial edge tiles on both axes; 70 rows of x make three row blocks of 32, the last partial.
    w = tiled_weight(7 * block - 3, 3 * block - 5, block, ROW_PATTERN, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(70, w.shape[1], generator=g).to(device, dtype)
    bias = torch.randn(w.shape[0], generator=g).to(device, dtype)
    with matmul_precision(precision):
        y = check_config(x, w, block, bias, (32, rows, 4, 3))
    for r in (1, 4, 6):  # the pruned tile-rows: exactly the bias
        cols = slice(r * block, min((r + 1) * block, w.shape[0]))
        assert torch.equal(y[:, cols], bias[cols].expand(70, -1))


@pytest.mark.parametrize("config", sparse_linear._TUNE_CONFIGS, ids=str)
def test_every_tuned_config(config, device):
    # 300 rows: a partial row block for every BM of the list.
    w = tiled_weight(7 * 32 - 3, 3 * 32 - 5, 32, ROW_PATTERN, dtype=torch.float16, device=device)
    x = torch.randn(300, w.shape[1], device=device).half()
    check_config(x, w, 32, torch.randn(w.shape[0], device=device).half(), config)


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_whole_blocks_unmasked(rows, device):
    # 256 rows and whole tiles take the unmasked path; 7 tile-rows leave past-the-end tile-rows
    # in the last group for ROWS 2 and 4, whose stores must still be dropped.
    w = tiled_weight(7 * 16, 3 * 16, 16, ROW_PATTERN, device=device)
    assert sparse_linear._even(256, w.shape[1], w.shape[0], 16)
    assert all(sparse_linear._EVEN_ROWS % bm == 0 for bm, *_ in sparse_linear._TUNE_CONFIGS)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, w.shape[1], generator=g).to(device)
    bias = torch.randn(w.shape[0], generator=g).to(device)
    with matmul_precision("ieee"):
        y = check_config(x, w, 16, bias, (128, rows, 4, 2))
    assert torch.equal(y[:, 16:32], bias[16:32].expand(256, -1))


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_block_64(precision, device):
    w = tiled_weight(130, 100, 64, [[1, 0], [0, 0], [1, 1]], device=device)
    with matmul_precision(precision):
        check(torch.randn(9, 100, device=device), w, 64, torch.randn(130, device=device))


@pytest.mark.parametrize("density", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_sparsities(density, device):
    w = tiled_weight(96, 80, 16, random_keep(6, 5, density, seed=int(density * 8)), device=device)
    y = check(torch.randn(33, 80, device=device), w, 16)
    if density == 0.0:
        assert not y.any()


def test_leading_dims_and_strided_input(device):
    w = tiled_weight(48, 40, 16, random_keep(3, 3, 0.5), device=device)
    x = torch.randn(2, 3, 80, device=device)[..., ::2]  # inner stride 2: the launcher copies it
    y = check(x, w, 16, torch.randn(48, device=device))
    assert y.shape == (2, 3, 48)
    empty = block_sparse_linear(torch.randn(0, 40, device=device), pack_block_sparse(w, 16))
    assert empty.shape == (0, 48)


def test_refusals(device):
    p = pack_block_sparse(torch.randn(32, 32, device=device), 16)
    with pytest.raises(ValueError, match="features"):
        block_sparse_linear(torch.randn(4, 31, device=device), p)
    with pytest.raises(ValueError, match="repack"):
        block_sparse_linear(torch.randn(4, 32, dtype=torch.float16, device=device), p)
    with pytest.raises(ValueError, match="block must be one of"):
        pack_block_sparse(torch.randn(32, 32), 8)
    with pytest.raises(ValueError, match="2-D"):
        pack_block_sparse(torch.randn(32), 16)


def test_launch_plan_is_the_tuned_launches():
    """One launch per autotune config at Swin-B stage 1's fc1 shape (K=128), every kernel
    argument given, and a grid that covers every row block and tile-row group."""
    import inspect

    plan = sparse_linear.launch_plan(200704, 128, 512, 32, kept_tiles=16)
    assert len(plan) == len(sparse_linear._TUNE_CONFIGS)
    for launch, (bm, rows, warps, stages) in zip(plan, sparse_linear._TUNE_CONFIGS):
        params = inspect.signature(launch.config.kernel.fn).parameters
        assert set(launch.args) | set(launch.config.constexprs) == set(params)
        assert launch.grid == (-(-200704 // bm) * -(-16 // rows),)
        assert launch.args["tiles_ptr"][0] == (16, 32, 32)
        assert (launch.config.num_warps, launch.config.num_stages) == (warps, stages)
