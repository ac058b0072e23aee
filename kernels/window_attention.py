"""Fused Swin window attention, read from and written to the token map; forward and backward.

Input is the qkv projection of the un-partitioned token map, (B, H, W, 3*C), channels as timm's
(3, heads, head_dim); output (B, H, W, C), ready for the output projection. ``window_attention``
is differentiable (an autograd Function over window_attention_kernels.py and
window_attention_backward_kernels.py) in the qkv tokens, the bias table and the qkv bias.

- shift and partition are index arithmetic: window token (y, x) of the shifted, padded grid reads
  token ((y + shift_h) % H, (x + shift_w) % W) and writes its output back there;
- grid positions past H or W are timm's zero padding through the qkv Linear: q, k, v = qkv bias;
- the relative-position bias, the shifted-window mask (only four window classes differ) or an
  explicit (n_mask, N, N) mask, and the padding to whole BLOCKs are folded by torch into one
  float32 tile per (class, head) (window_attention_tiles.py: cached while table and mask keep
  their versions; its gradient, summed over windows by the backward, goes back to the table);
- keys are visited BLOCK at a time with an online softmax: 12x12 and 16x16 windows fit Hopper's
  shared memory in every dtype. ``launch_plan``, ``launch_configs``: launches and compiles.
"""

from __future__ import annotations

import inspect

import torch

from ._common import (FLOAT_DTYPES, Launch, LaunchConfig, check_runnable, device_guard,
                      interpreting, pointer, triton)
from .window_attention_backward_kernels import (_window_attn_bwd_dbias, _window_attn_bwd_dkdv,
                                                _window_attn_bwd_dq, _window_attn_bwd_one)
from .window_attention_kernels import _window_attn_fwd
from .window_attention_settings import get_bias_grad, get_kv_prefetch
from .window_attention_reference import (  # noqa: F401  (re-exported: one import site for users)
    MASK_NEG,
    MAX_HEAD_DIM,
    check_inputs,
    check_mask_count,
    dense_position_bias,
    folded_bias_tile,
    grid_dims,
    region_class_masks,
    relative_position_index,
    shifted_window_mask,
    unfold_bias_grad,
    unsupported,
    window_attention_reference,
)
from .window_attention_tiles import bias_tile, table_grad

# Dot precision -> padded head dim -> (tokens per tile, warps, pipeline stages) on a GPU, read
# from sm_90 compiles. Tensor-core dots: one warpgroup (4 warps) owns a 64-token tile, the
# M of one wgmma, so no two warpgroups compute the same scores; a 7x7 window (49 tokens) is one
# tile. Three stages keep the q, k and v of the next two heads in flight while one computes
# (the backward takes two: its registers are the limit). ieee float32 dots run on the FMA units
# and spill at 64-token tiles: smaller tiles there.
_GPU_TILES = {"tf32": {16: (64, 4, 3), 32: (64, 4, 3), 64: (64, 4, 2), 128: (32, 4, 2)},
              "ieee": {16: (32, 4, 1), 32: (32, 4, 1), 64: (16, 4, 1), 128: (16, 4, 1)}}
_BWD_ONE_WARPS = 4
_BWD_ONE_MAX_FP32_HDP = 32  # float32 at head dim 64+ needs over 227 KiB of shared memory there
_BWD_STAGES = 2
_DBIAS_WARPS = 8  # sm_90: 128 registers (177 at 4 warps, 2 blocks an SM either way)
# Windows over several tiles: one stage (two: 176 registers, 2 blocks an SM at 12x12), or with
# kv_prefetch "on" three on the key-block loop (two copy a block only after the last one's reads).
_MULTI_BLOCK_FWD_STAGES = 1
_KV_PREFETCH_STAGES = 3
_HEADS_PER_PROGRAM = 4
_SMS = 132  # H100 SXM: a backward program sums the bias gradient over about windows*heads/(8*SMs)
_PRECISIONS = {torch.float32: ("ieee", "tf32"), torch.float16: ("tf32",), torch.bfloat16: ("tf32",)}


def _head_dim_pad(hd: int) -> int:
    return max(16, triton.next_power_of_2(hd))


def _precision(dtype: torch.dtype) -> str:
    # float32 dots use TF32 tensor cores only where torch itself is allowed to (as F.linear does).
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


class _Geometry:
    """Everything the kernels are launched with, from the shapes alone (tensors may be meta)."""

    def __init__(self, qkv: torch.Tensor, num_heads: int, win, shift, n_mask: int | None,
                 has_bias: bool, scale: float, precision: str | None = None,
                 interp: bool | None = None):
        bsz, h, w, c3 = qkv.shape
        c = c3 // 3
        hd = c // num_heads
        hp, wp, n_win, n_win_w = grid_dims(h, w, win)
        self.bsz, self.h, self.w, self.c, self.heads, self.win = bsz, h, w, c, num_heads, win
        self.n = win[0] * win[1]
        self.n_windows = bsz * n_win
        hdp = _head_dim_pad(hd)
        self.prec = precision or _precision(qkv.dtype)
        block, self.warps, self.stages = _GPU_TILES[self.prec][hdp]
        self.bwd_stages = min(self.stages, _BWD_STAGES)
        self.interp = interpreting(_window_attn_fwd) if interp is None else interp
        if self.interp:  # the interpreter pays per element: tiny windows get tiny tiles there
            block = min(block, max(16, triton.next_power_of_2(self.n)))
        self.block, self.nb = block, triton.cdiv(self.n, block)
        self.tail = _tail(self.n, block)
        self.fwd_stages = self.stages if self.nb == 1 else _MULTI_BLOCK_FWD_STAGES
        self.kv_stages = _KV_PREFETCH_STAGES if self.nb > 1 and get_kv_prefetch() == "on" else 1
        self.hpp = min(num_heads, _HEADS_PER_PROGRAM)
        self.groups = triton.cdiv(num_heads, self.hpp)
        regions = n_mask is None
        self.scalars = dict(
            H=h, W=w, n_win=n_win, n_win_w=n_win_w, n_win_h=hp // win[0], shift_h=shift[0],
            shift_w=shift[1], n_mask=n_mask or 1, cls_h=int(regions and shift[0] > 0),
            cls_w=int(regions and shift[1] > 0), scale=scale, s_qb=qkv.stride(0),
            s_qh=qkv.stride(1), s_qw=qkv.stride(2), s_ob=h * w * c, s_oh=w * c, s_ow=c, C=c,
            HEADS=num_heads, HD=hd, WH=win[0], WW=win[1])
        self.const = dict(HDP=hdp, BLOCK=block, PAD=bool(has_bias and (hp > h or wp > w)),
                          EVEN_D=hd == hdp, PREC=self.prec,
                          UPCAST=qkv.dtype == torch.bfloat16 and self.interp)
        self.dtype = qkv.dtype
        self.one_program_backward = _one_program_backward(self.nb, qkv.dtype, hdp)

    def windows_per_program(self, pieces: int, cap: int) -> int:
        # a run's programs (heads x pieces): ~8 an SM; the interpreter's tests: partial runs too
        wpp = self.n_windows * self.heads * pieces // (8 * _SMS)
        return 2 if self.interp else max(1, min(cap, wpp))

    def launches(self, train: bool, backward: bool, want_bias: bool = True,
                 want_qkv_bias: bool = True) -> list:
        """(kernel, grid, scalar args, constexprs, warps, stages) of the forward, or of the
        backward, in launch order."""
        blocked = dict(NB=self.nb, **self.const)
        split = (self.n_windows * self.groups * self.nb,)
        common = dict(self.scalars, heads_per_program=self.hpp, n_groups=self.groups)
        if not backward:
            return [(_window_attn_fwd, split, dict(common, store_lse=int(train)),
                     dict(blocked, TAIL=self.tail, KV_STAGES=self.kv_stages), self.warps,
                     self.fwd_stages)]
        if self.one_program_backward:
            wpp = self.windows_per_program(1, 64)
            args = dict(self.scalars, n_windows=self.n_windows, windows_per_program=wpp,
                        want_dbias=int(want_bias), want_dqkv_bias=int(want_qkv_bias))
            return [(_window_attn_bwd_one, (triton.cdiv(self.n_windows, wpp) * self.heads,), args,
                     self.const, _BWD_ONE_WARPS, self.bwd_stages)]
        by_kernel = want_bias and get_bias_grad() == "sum"
        out = [(_window_attn_bwd_dq, split, common,
                dict(blocked, DBIAS=want_bias and not by_kernel), self.warps, self.bwd_stages),
               (_window_attn_bwd_dkdv, split, dict(common, want_dqkv_bias=int(want_qkv_bias)),
                blocked, self.warps, self.bwd_stages)]
        if by_kernel:
            wpp = self.windows_per_program(self.nb * self.nb, self.n_windows)
            grid = (triton.cdiv(self.n_windows, wpp) * self.heads * self.nb ** 2,)
            out.append((_window_attn_bwd_dbias, grid,
                        dict(self.scalars, n_windows=self.n_windows, windows_per_program=wpp),
                        blocked, _DBIAS_WARPS, self.bwd_stages))
        return out


def _tail(n: int, block: int) -> int:
    """Keys the forward visits in a window's last key block: what is left of the window, to a
    power of two of at least 16 (a 12x12 window: 64 + 64 + 16 keys, not 3 x 64)."""
    last = n - (triton.cdiv(n, block) - 1) * block
    return min(block, max(16, triton.next_power_of_2(last)))


def _one_program_backward(nb: int, dtype: torch.dtype, hdp: int) -> bool:
    """Whether one kernel does the whole backward (windows of one block, where it fits sm_90)."""
    return nb == 1 and (dtype.itemsize == 2 or hdp <= _BWD_ONE_MAX_FP32_HDP)


def _arg_names(kernel) -> list:
    return list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)


def _launch(kernel, grid, scalars, const, warps, stages, pointers: dict) -> None:
    """Launch with the pointers ``kernel`` takes out of ``pointers``."""
    names = _arg_names(kernel)
    mine = {k: v for k, v in pointers.items() if k in names}
    with device_guard(next(iter(mine.values())).device):
        kernel[grid](**mine, **scalars, **const, num_warps=warps, num_stages=stages)


class FusedWindowAttention(torch.autograd.Function):
    """The fused window attention as an autograd Function (``window_attention`` is its keyword
    form; arguments positional: qkv_tokens, rel_pos_table, qkv_bias, mask, num_heads, window_size,
    shift_size, scale). Under torch.compile it runs eagerly (a graph break at ``apply``): the
    launchers read data pointers and version counters, which dynamo's fake tensors lack."""

    @staticmethod
    @torch.compiler.disable
    def forward(ctx, qkv, table, qkv_bias, mask, num_heads, window_size, shift_size, scale):
        win, shift = check_inputs(qkv, table, num_heads, window_size, shift_size, qkv_bias, mask)
        check_runnable(_window_attn_fwd, qkv.device, "window_attention")
        check_mask_count(mask, qkv.shape[0] * grid_dims(*qkv.shape[1:3], win)[2])
        if scale is None:
            scale = (qkv.shape[-1] // (3 * num_heads)) ** -0.5
        qkv = qkv.contiguous() if ctx.needs_input_grad[0] or qkv.stride(-1) != 1 else qkv
        geo = _Geometry(qkv, num_heads, win, shift, None if mask is None else mask.shape[0],
                        qkv_bias is not None, float(scale))
        tile = bias_tile(table, mask, win, shift, geo.block)
        out = torch.empty(geo.bsz, geo.h, geo.w, geo.c, dtype=qkv.dtype, device=qkv.device)
        train = any(ctx.needs_input_grad[:3])
        lse = torch.empty((geo.bsz, geo.h, geo.w, num_heads) if train else (1,),
                          dtype=torch.float32, device=qkv.device)
        qkv_bias_arg = qkv_bias.to(qkv.dtype).contiguous() if qkv_bias is not None else qkv
        if out.numel():
            for launch in geo.launches(train, backward=False):
                _launch(*launch, dict(qkv_ptr=qkv, tile_ptr=tile, qkv_bias_ptr=qkv_bias_arg,
                                      out_ptr=out, lse_ptr=lse))
        if train:
            ctx.save_for_backward(qkv, tile, qkv_bias_arg, out, lse, table)
            ctx.geo, ctx.bias_dtype = geo, None if qkv_bias is None else qkv_bias.dtype
        return out

    @staticmethod
    @torch.compiler.disable
    def backward(ctx, d_out):
        qkv, tile, qkv_bias_arg, out, lse, table = ctx.saved_tensors
        geo = ctx.geo
        d_out = d_out.contiguous()
        dqkv = torch.empty_like(qkv)
        want_bias, want_qkv_bias = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dtile = torch.zeros((geo.heads, geo.nb, geo.nb, geo.block, geo.block) if want_bias
                            else (1,), dtype=torch.float32, device=qkv.device)
        dqkv_bias = torch.zeros(qkv.shape[-1] if want_qkv_bias else 1, dtype=torch.float32,
                                device=qkv.device)
        delta = torch.empty((1,) if geo.one_program_backward else lse.shape, dtype=torch.float32,
                            device=qkv.device)
        pointers = dict(qkv_ptr=qkv, tile_ptr=tile, qkv_bias_ptr=qkv_bias_arg, out_ptr=out,
                        do_ptr=d_out, lse_ptr=lse, delta_ptr=delta, dqkv_ptr=dqkv,
                        dtile_ptr=dtile, dqkv_bias_ptr=dqkv_bias)
        if dqkv.numel():
            for launch in geo.launches(True, True, want_bias, want_qkv_bias):
                _launch(*launch, pointers)
        d_table = table_grad(unfold_bias_grad(dtile, geo.n), table, geo.win) if want_bias else None
        return (dqkv, d_table, dqkv_bias.to(ctx.bias_dtype) if want_qkv_bias else None, None,
                None, None, None, None)


def window_attention(qkv_tokens: torch.Tensor, rel_pos_table: torch.Tensor, num_heads: int,
                     window_size, shift_size=0, *, qkv_bias: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Swin (shifted-)window attention of a token map, fused (Triton); returns (B, H, W, C).

    ``qkv_tokens`` (B, H, W, 3*C): the qkv Linear applied to the token map, before any roll or
    partition. ``rel_pos_table``: timm's ``relative_position_bias_table``, or a dense (heads, N, N)
    bias (SwinV2's continuous position bias, computed by torch). ``qkv_bias``: the qkv
    Linear's bias, the q/k/v of the zero padding when H or W is not a multiple of the window.
    ``mask``: None for timm's shifted-window mask (computed in the kernel when a shift is
    nonzero), or an explicit additive (n_mask, N, N) mask used instead. ``scale`` defaults to
    head_dim ** -0.5. Gradients flow to ``qkv_tokens``, ``rel_pos_table`` and ``qkv_bias``.
    """
    return FusedWindowAttention.apply(qkv_tokens, rel_pos_table, qkv_bias, mask, num_heads,
                                      window_size, shift_size, scale)


def _types(dtype: torch.dtype) -> dict:
    t = pointer(dtype)
    return {"qkv_ptr": t, "tile_ptr": "*fp32", "qkv_bias_ptr": t, "out_ptr": t, "lse_ptr": "*fp32",
            "do_ptr": t, "delta_ptr": "*fp32", "dqkv_ptr": t, "dtile_ptr": "*fp32",
            "dqkv_bias_ptr": "*fp32", "scale": "fp32"}


def _config(kernel, dtype, prec, const, warps, stages) -> LaunchConfig:
    names = _arg_names(kernel)
    label = pointer(dtype)[1:] + (f"/{prec}" if dtype == torch.float32 else "")
    types = {**_types(dtype), **{a: "i32" for a in names if a not in _types(dtype)}}
    knobs = " ".join(f"{k}={v}" for k, v in const.items() if k not in ("PREC", "UPCAST"))
    return LaunchConfig.of(kernel, f"{_name(kernel)} {label} {knobs}", types, const, warps,
                           stages)


def _name(kernel) -> str:
    return getattr(kernel, "fn", kernel).__name__.lstrip("_")


def launch_plan(batch: int, height: int, width: int, channels: int, num_heads: int, window_size,
                shift_size=0, dtype: torch.dtype = torch.float16, *, n_mask: int | None = None,
                qkv_bias: bool = True, train: bool = False, backward: bool = False) -> list:
    """The launches (``Launch``: compile, grid, argument values) ``window_attention`` makes on a
    GPU for a (batch, height, width, 3*channels) qkv token map: its forward (storing the
    log-sum-exp when ``train``), or with ``backward`` the backward's, in order. ``n_mask``: the
    windows of an explicit mask, None for the shift's regions."""
    win = tuple(int(v) for v in (window_size if not isinstance(window_size, int)
                                 else (window_size, window_size)))
    shift = tuple(int(v) for v in (shift_size if not isinstance(shift_size, int)
                                   else (shift_size, shift_size)))
    qkv = torch.empty(batch, height, width, 3 * channels, dtype=dtype, device="meta")
    geo = _Geometry(qkv, num_heads, win, shift, n_mask, qkv_bias,
                    (channels // num_heads) ** -0.5, interp=False)
    n_class = n_mask or (4 if any(shift) else 1)
    tokens = (batch, height, width)
    shapes = dict(qkv_ptr=qkv.shape, tile_ptr=(n_class, num_heads, geo.nb, geo.nb, geo.block,
                                                 geo.block),
                  qkv_bias_ptr=(3 * channels,), out_ptr=(*tokens, channels),
                  lse_ptr=(*tokens, num_heads) if train or backward else (1,),
                  do_ptr=(*tokens, channels), delta_ptr=(*tokens, num_heads),
                  dqkv_ptr=qkv.shape, dtile_ptr=(num_heads, geo.nb, geo.nb, geo.block, geo.block),
                  dqkv_bias_ptr=(3 * channels,))
    plan = []
    for kernel, grid, scalars, const, warps, stages in geo.launches(train, backward):
        cfg = _config(kernel, dtype, geo.prec, const, warps, stages)
        args = {a: (shapes[a], torch.float32 if cfg.signature[a] == "*fp32" else dtype)
                if a.endswith("_ptr") else scalars[a]
                for a, t in cfg.signature.items() if t != "constexpr"}
        plan.append(Launch(cfg, grid, args))
    return plan


def _blocked_backward(dtype, prec, const, warps, stages) -> list:
    # both ways to the bias gradient (window_attention_settings), and the dQ kernel of a table
    # without one
    return [_config(_window_attn_bwd_dq, dtype, prec, dict(const, DBIAS=dbias), warps, stages)
            for dbias in (True, False)] + [
        _config(_window_attn_bwd_dkdv, dtype, prec, const, warps, stages),
        _config(_window_attn_bwd_dbias, dtype, prec, const, _DBIAS_WARPS, stages)]


def launch_configs() -> list:
    """Every compile the launchers can ask for on a GPU: per dtype, dot precision and padded head
    dim, forward and backward (at head dim 32 also 12x12's), with padding tokens (larger code)."""
    out = []
    for dtype, precs in _PRECISIONS.items():
        for prec in precs:
            for hdp, (block, warps, stages) in _GPU_TILES[prec].items():
                const = dict(HDP=hdp, BLOCK=block, PAD=True, EVEN_D=True, PREC=prec, UPCAST=False)
                out.append(_config(_window_attn_fwd, dtype, prec,
                                   dict(const, NB=1, TAIL=block, KV_STAGES=1), warps, stages))
                bwd = min(stages, _BWD_STAGES)
                if _one_program_backward(1, dtype, hdp):
                    out.append(_config(_window_attn_bwd_one, dtype, prec, const, _BWD_ONE_WARPS,
                                       bwd))
                else:
                    out += _blocked_backward(dtype, prec, dict(const, NB=1), warps, bwd)
                if hdp == 32:  # 144 tokens: 3 blocks of 64 (5 of 32 for ieee float32)
                    nb = triton.cdiv(144, block)
                    out += [_config(_window_attn_fwd, dtype, prec, dict(const, NB=nb,
                                    TAIL=_tail(144, block), KV_STAGES=kv), warps,
                                    _MULTI_BLOCK_FWD_STAGES) for kv in (1, _KV_PREFETCH_STAGES)]
                    out += _blocked_backward(dtype, prec, dict(const, NB=nb), warps, bwd)
    return out
