"""Block-sparse linear layer y = x W^T + b, with W stored as its kept BxB tiles.

Format (``BlockSparseWeight``): W (out x in) is zero-padded to whole tiles and cut into a grid
of R tile-rows (output features) by C tile-columns (input features). A tile that is all zero is
pruned; the kept tiles are stored tile-row by tile-row (CSR over tiles):

- ``tiles[t]`` is the kept tile ``W[r*B:(r+1)*B, c*B:(c+1)*B]`` *transposed* (input-major), so
  the kernel's (K x N) operand is read with unit stride along N;
- ``col_idx[t]`` is its tile-column c;
- the tiles of tile-row r are ``row_ptr[r]:row_ptr[r+1]``.

One launch: a program owns BM rows of x and ROWS consecutive output tile-rows, and for each
accumulates in float32 over that row's kept tiles only, in a software-pipelined loop; a tile-row
with no kept tile writes just the bias.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._common import (
    FLOAT_DTYPES,
    HAVE_TRITON,
    Launch,
    LaunchConfig,
    check_runnable,
    device_guard,
    interpreting,
    pointer,
    tl,
    triton,
)

TILE_SIZES = (16, 32, 64)
# BM rows of x, ROWS tile-rows per program, warps, stages. ROWS=1 stays in the list: with few
# tile-rows (small N) or few row blocks, more programs beat more work per program. Each stage
# holds a BMxB x tile and a BxB weight tile: BM=256 gets 2 stages, as 3 of fp32 B=64 would need
# 240 KiB of shared memory (sm_90 allows 227). ROWS=8 is for pruned weights: it covers a
# 512-wide output in one program, so each row of x is read once, and at 25% of 64x64 tiles kept
# a tile-row has about 2 tiles, too few for a deeper pipeline than 2 stages to overlap at 4 warps.
_TUNE_CONFIGS = ((64, 1, 4, 3), (128, 1, 4, 3), (128, 2, 4, 4), (128, 4, 8, 3), (256, 2, 8, 2),
                 (128, 8, 4, 2), (128, 8, 8, 3))
# Every BM divides it: a launch whose rows are a multiple of it needs no row masks in any config.
_EVEN_ROWS = 256
# The interpreter pays per program far more than per element: few, big programs.
_INTERP_CONFIG = (64, 2, 1, 1)


@dataclass(frozen=True)
class BlockSparseWeight:
    """Kept BxB tiles of a (out_features x in_features) weight, tile-row by tile-row."""

    tiles: torch.Tensor  # (nnz, B, B), each tile transposed: tiles[t][k, n] = W[r*B + n, c*B + k]
    row_ptr: torch.Tensor  # (R + 1,) int64: the loop counter inherits it, so t*B*B cannot overflow
    col_idx: torch.Tensor  # (nnz,) int32
    out_features: int
    in_features: int
    block: int

    @property
    def grid(self) -> tuple[int, int]:
        """(tile-rows, tile-columns) of the padded weight."""
        b = self.block
        return -(-self.out_features // b), -(-self.in_features // b)

    @property
    def density(self) -> float:
        """Fraction of tiles kept."""
        r, c = self.grid
        return self.col_idx.numel() / (r * c)

    def to(self, *args, **kwargs) -> "BlockSparseWeight":
        """Tiles follow ``Tensor.to``'s device and dtype; the indices follow only the device."""
        tiles = self.tiles.to(*args, **kwargs)
        dev = tiles.device
        return BlockSparseWeight(tiles, self.row_ptr.to(dev), self.col_idx.to(dev),
                                 self.out_features, self.in_features, self.block)


def _check_block(block) -> int:
    if block not in TILE_SIZES:
        raise ValueError(f"block must be one of {TILE_SIZES}, got {block!r}")
    return int(block)


def _tile_grid(weight: torch.Tensor, block: int) -> torch.Tensor:
    """(R, C, B, B) view of the zero-padded weight: [r, c] is W[r*B:(r+1)*B, c*B:(c+1)*B]."""
    n, k = weight.shape
    r, c = -(-n // block), -(-k // block)
    w = F.pad(weight, (0, c * block - k, 0, r * block - n))
    return w.view(r, block, c, block).permute(0, 2, 1, 3)


def tile_sparsity(weight: torch.Tensor, block: int) -> float:
    """Fraction of the BxB tiles of ``weight`` (zero-padded to whole tiles) that are all zero."""
    block = _check_block(block)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out x in), got shape {tuple(weight.shape)}")
    kept = _tile_grid(weight.detach(), block).ne(0).flatten(2).any(2)
    return 1.0 - kept.float().mean().item()


def pack_block_sparse(weight: torch.Tensor, block: int = 32) -> BlockSparseWeight:
    """Pack ``weight``'s nonzero BxB tiles; all-zero tiles are the pruned ones and are dropped.

    Dimensions that are not multiples of ``block`` are zero-padded (the padding is never read
    back: the kernel masks x's columns and y's columns at the true sizes).
    """
    block = _check_block(block)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D torch.Tensor (out_features x in_features)")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    w = weight.detach()
    grid = _tile_grid(w, block)
    kept = grid.ne(0).flatten(2).any(2)  # (R, C)
    rows, cols = kept.nonzero(as_tuple=True)  # row-major: tiles come out grouped by tile-row
    tiles = grid[rows, cols].transpose(1, 2).contiguous()
    row_ptr = torch.zeros(kept.shape[0] + 1, dtype=torch.int64, device=w.device)
    torch.cumsum(kept.sum(1), 0, out=row_ptr[1:])
    return BlockSparseWeight(tiles, row_ptr, cols.to(torch.int32), w.shape[0], w.shape[1], block)


def unpack_block_sparse(packed: BlockSparseWeight) -> torch.Tensor:
    """The dense (out_features x in_features) weight that ``packed`` stores."""
    b = packed.block
    r, c = packed.grid
    grid = torch.zeros(r, c, b, b, dtype=packed.tiles.dtype, device=packed.tiles.device)
    counts = packed.row_ptr[1:] - packed.row_ptr[:-1]
    rows = torch.repeat_interleave(torch.arange(r, device=counts.device), counts)
    grid[rows, packed.col_idx.long()] = packed.tiles.transpose(1, 2)
    dense = grid.permute(0, 2, 1, 3).reshape(r * b, c * b)
    return dense[: packed.out_features, : packed.in_features]


@triton.jit
def _bsr_linear(x_ptr, tiles_ptr, row_ptr, col_ptr, bias_ptr, y_ptr, M, N, K, R,
                stride_xm, stride_ym,
                HAS_BIAS: tl.constexpr, BM: tl.constexpr, B: tl.constexpr, ROWS: tl.constexpr,
                STAGES: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                EVEN: tl.constexpr):
    # A program owns BM rows of x and ROWS consecutive tile-rows, done one after the other: the
    # tile-rows have different kept columns, so there is no x tile to share in registers, but the
    # x tiles the first one reads are still in L2 for the next. Tile-row groups vary fastest so
    # that programs running together also share those rows of x.
    pid = tl.program_id(0)
    groups = tl.cdiv(R, ROWS)
    pm = pid // groups
    rm = (pm * BM + tl.arange(0, BM)).to(tl.int64)
    rb = tl.arange(0, B)
    # EVEN: M, N and K are whole blocks, so no x load or y store needs a mask (masks cost a
    # predicate per element and keep the loads from being vectorized).
    m_ok = rm < M
    x_rows = x_ptr + rm[:, None] * stride_xm
    w_tile = rb[:, None] * B + rb[None, :]
    for i in range(ROWS):
        r = (pid % groups) * ROWS + i
        # Past the last tile-row (R not a multiple of ROWS): an empty loop and a masked store.
        t0 = tl.load(row_ptr + r, mask=r < R, other=0)
        t1 = tl.load(row_ptr + r + 1, mask=r < R, other=0)
        acc = tl.zeros((BM, B), dtype=tl.float32)
        # The column index is loaded one iteration ahead, so the x tile's address never waits
        # on a load issued in its own iteration and the pipeliner can run the x loads ahead.
        c = tl.load(col_ptr + t0, mask=t0 < t1, other=0)
        for t in tl.range(t0, t1, num_stages=STAGES):
            c_next = tl.load(col_ptr + t + 1, mask=t + 1 < t1, other=0)
            k = c * B + rb
            if EVEN:
                xt = tl.load(x_rows + k[None, :])
            else:
                xt = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k[None, :] < K), other=0.0)
            wt = tl.load(tiles_ptr + t * (B * B) + w_tile)
            if UPCAST:
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, wt, acc, input_precision=PREC)
            c = c_next
        n = r * B + rb
        n_ok = n < N
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y_tile = y_ptr + rm[:, None] * stride_ym + n[None, :]
        if EVEN:
            # Only a tile-row past the last (R not a multiple of ROWS) is dropped: n < N is r < R.
            tl.store(y_tile, acc.to(y_ptr.dtype.element_ty), mask=n_ok[None, :])
        else:
            tl.store(y_tile, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


if HAVE_TRITON:
    # Autotuned twin for the GPU; the interpreter keeps the plain kernel (tuning would run every
    # config in Python).
    _bsr_linear_tuned = triton.autotune(
        configs=[triton.Config({"BM": bm, "ROWS": rows, "STAGES": s}, num_warps=w, num_stages=s)
                 for bm, rows, w, s in _TUNE_CONFIGS],
        key=["M", "N", "K", "B"],
    )(_bsr_linear)
else:
    _bsr_linear_tuned = None


def _upcast(kernel, dtype: torch.dtype) -> bool:
    # The interpreter keeps bfloat16 as raw uint16 bits and its dot multiplies those integers;
    # widening both operands to float32 first is exact, and a GPU never takes this branch.
    return dtype == torch.bfloat16 and interpreting(kernel)


def _even(m: int, k: int, n: int, block: int) -> bool:
    return m % _EVEN_ROWS == 0 and k % block == 0 and n % block == 0


def _precision(dtype: torch.dtype) -> str:
    # Match F.linear: float32 uses TF32 tensor cores only where torch itself is allowed to.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def block_sparse_linear(x: torch.Tensor, packed: BlockSparseWeight,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b over the kept tiles only (Triton); x is (..., in_features)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a torch.Tensor of shape (..., in_features)")
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {packed.in_features}")
    if x.dtype not in FLOAT_DTYPES or packed.tiles.dtype != x.dtype:
        raise ValueError(f"x ({x.dtype}) and the packed tiles ({packed.tiles.dtype}) must share one "
                         "of float32, float16, bfloat16: repack with weight.to(x.dtype)")
    if bias is not None and (bias.shape != (packed.out_features,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be ({packed.out_features},) of {x.dtype}")
    others = [packed.tiles, packed.row_ptr, packed.col_idx] + ([bias] if bias is not None else [])
    if any(t.device != x.device for t in others):
        raise ValueError(f"x is on {x.device}: move the packed weight (packed.to(device)) and bias there")
    check_runnable(_bsr_linear, x.device, "block_sparse_linear")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, packed.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n, k = x2.shape[0], packed.out_features, packed.in_features
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*lead, n)
    _launch(x2, packed, bias, y)
    return y.view(*lead, n)


def _launch(x2: torch.Tensor, packed: BlockSparseWeight, bias: torch.Tensor | None,
            y: torch.Tensor, config: tuple | None = None) -> None:
    """y = x2 W^T + b for a 2-D x2 with unit inner stride; ``config`` (BM, ROWS, warps, stages)
    forces one launch config (tests check each), else autotuning picks on a GPU."""
    (m, k), n, r = x2.shape, packed.out_features, packed.grid[0]
    b_arg = bias if bias is not None else y  # never read without HAS_BIAS
    args = (x2, packed.tiles, packed.row_ptr, packed.col_idx, b_arg, y, m, n, k, r,
            x2.stride(0), y.stride(0))
    consts = dict(HAS_BIAS=bias is not None, B=packed.block, PREC=_precision(x2.dtype),
                  UPCAST=_upcast(_bsr_linear, x2.dtype), EVEN=_even(m, k, n, packed.block))
    if config is None and (interpreting(_bsr_linear) or _bsr_linear_tuned is None):
        config = _INTERP_CONFIG
    with device_guard(x2.device):
        if config is None:
            def grid(meta):
                return (triton.cdiv(m, meta["BM"]) * triton.cdiv(r, meta["ROWS"]),)

            _bsr_linear_tuned[grid](*args, **consts)
        else:
            bm, rows, warps, stages = config
            grid = (triton.cdiv(m, bm) * triton.cdiv(r, rows),)
            consts["EVEN"] = consts["EVEN"] and m % bm == 0
            _bsr_linear[grid](*args, BM=bm, ROWS=rows, STAGES=stages, num_warps=warps,
                              num_stages=stages, **consts)


def block_sparse_linear_reference(x: torch.Tensor, packed: BlockSparseWeight,
                                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch block_sparse_linear: unpack to the dense weight, float32 F.linear, cast back."""
    w = unpack_block_sparse(packed).float()
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


def launch_plan(rows: int, in_features: int, out_features: int, block: int = 32,
                kept_tiles: int | None = None, dtype: torch.dtype = torch.float16,
                bias: bool = True) -> list[Launch]:
    """The launches ``block_sparse_linear`` may make on a GPU for x (rows, in_features) and a
    weight with ``kept_tiles`` BxB tiles (default all): one per autotune config, of which the
    autotuner runs the fastest (each compile with its grid and argument values)."""
    block = _check_block(block)
    r, c = -(-out_features // block), -(-in_features // block)
    nnz = r * c if kept_tiles is None else int(kept_tiles)
    t = pointer(dtype)
    types = dict(x_ptr=t, tiles_ptr=t, row_ptr=pointer(torch.int64), col_ptr=pointer(torch.int32),
                 bias_ptr=t, y_ptr=t, M="i32", N="i32", K="i32", R="i32", stride_xm="i32",
                 stride_ym="i32")
    args = dict(x_ptr=((rows, in_features), dtype), tiles_ptr=((nnz, block, block), dtype),
                row_ptr=((r + 1,), torch.int64), col_ptr=((nnz,), torch.int32),
                bias_ptr=((out_features,) if bias else (rows, out_features), dtype),
                y_ptr=((rows, out_features), dtype), M=rows, N=out_features, K=in_features, R=r,
                stride_xm=in_features, stride_ym=out_features)
    plan = []
    for bm, rows_per, warps, stages in _TUNE_CONFIGS:
        constexprs = dict(HAS_BIAS=bias, BM=bm, B=block, ROWS=rows_per, STAGES=stages,
                          PREC=_precision(dtype), UPCAST=False,
                          EVEN=_even(rows, in_features, out_features, block))
        cfg = LaunchConfig.of(_bsr_linear, f"sparse_linear {t[1:]} B={block} BM={bm} ROWS={rows_per} "
                              f"w{warps} s{stages}", types, constexprs, warps, stages)
        plan.append(Launch(cfg, (triton.cdiv(rows, bm) * triton.cdiv(r, rows_per),), dict(args)))
    return plan


def launch_configs() -> list[LaunchConfig]:
    """Every autotune config of block_sparse_linear on a GPU, for every dtype, float32 precision,
    bias and block it accepts."""
    out = []
    for dtype in FLOAT_DTYPES:
        t = pointer(dtype)
        types = dict(x_ptr=t, tiles_ptr=t, row_ptr=pointer(torch.int64), col_ptr=pointer(torch.int32),
                     bias_ptr=t, y_ptr=t, M="i32", N="i32", K="i32", R="i32", stride_xm="i32",
                     stride_ym="i32")
        precisions = ("ieee", "tf32") if dtype == torch.float32 else (_precision(dtype),)
        for prec, has_bias, even, block, (bm, rows, warps, stages) in itertools.product(
                precisions, (False, True), (False, True), TILE_SIZES, _TUNE_CONFIGS):
            kind = f"{t[1:]}-{prec}" if dtype == torch.float32 else t[1:]
            name = (f"sparse_linear {kind}{' bias' if has_bias else ''}{' even' if even else ''} "
                    f"B={block} BM={bm} "
                    f"ROWS={rows} w{warps} s{stages}")
            # UPCAST is the interpreter's bfloat16 workaround: a GPU never takes it.
            constexprs = dict(HAS_BIAS=has_bias, BM=bm, B=block, ROWS=rows, STAGES=stages,
                              PREC=prec, UPCAST=False, EVEN=even)
            out.append(LaunchConfig.of(_bsr_linear, name, types, constexprs, warps, stages))
    return out
