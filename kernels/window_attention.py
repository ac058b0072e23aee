"""Fused Swin window attention, read from and written to the token map; forward and backward.

Input is the qkv projection of the un-partitioned token map, (B, H, W, 3*C) with channels laid
out as timm's (3, heads, head_dim); output is (B, H, W, C) with channels (heads, head_dim), ready
for the output projection. ``window_attention`` is differentiable (a torch.autograd.Function
over the kernels of window_attention_kernels.py) with respect to the qkv tokens, the bias table
and the qkv bias.

- the cyclic shift and the window partition are index arithmetic: window token (y, x) of the
  shifted, padded grid reads token ((y + shift_h) % H, (x + shift_w) % W), and its output is
  written back to that same token, which is the reverse partition and reverse shift;
- grid positions past H or W (resolution not a multiple of the window) are timm's zero padding
  put through the qkv Linear, so their q, k, v are the qkv bias; their outputs are dropped;
- the relative-position bias is expanded from timm's (2*Wh-1)*(2*Ww-1) x heads table into a
  dense float32 (heads, N, N) tensor by torch on every call (a few KB; autograd takes the
  gradient back to the table), which the kernels read with contiguous loads instead of
  gathering through an index tile: a gathered (64, 64) tile of 64-bit pointers spilled;
- the shifted-window mask is computed from the grid coordinates: timm's nine regions (three per
  shifted axis), -100 between tokens of different regions; alternatively an explicit additive
  mask (n_mask, N, N), window ``(b * windows_per_image + w) % n_mask`` as in timm, is added to
  the dense bias beforehand, giving (n_mask, heads, N, N);
- keys are visited BLOCK at a time with an online softmax, so the on-chip footprint depends on
  BLOCK and the head dim, never on the window: 12x12 and 16x16 windows fit Hopper's shared
  memory in every dtype. Window, head count, head dim, shift and mask are runtime values; only
  the padded head dim, BLOCK and the dot precision are compiled in, so ``launch_configs()``
  lists every configuration the launchers can pick (checked by dimap_fast.hopper_fit).
"""

from __future__ import annotations

import torch

from ._common import FLOAT_DTYPES, LaunchConfig, check_runnable, device_guard, interpreting, pointer, triton
from .window_attention_kernels import _window_attn_bwd_dkdv, _window_attn_bwd_dq, _window_attn_fwd
from .window_attention_reference import (  # noqa: F401  (re-exported: one import site for users)
    MASK_NEG,
    MAX_HEAD_DIM,
    check_inputs,
    check_mask_count,
    dense_position_bias,
    grid_dims,
    relative_position_index,
    shifted_window_mask,
    unsupported,
    window_attention_reference,
)

# Dot precision -> padded head dim -> (tokens per tile, warps, pipeline stages) on a GPU, chosen
# from sm_90 compiles (dimap_fast.hopper_fit). Tensor-core dots (fp16, bf16, tf32): at most
# 131 KB of shared memory and no spills up to head dim 64. ieee float32 dots run on the FMA
# units and ptxas spilled kilobytes per thread at 64-token tiles, so they get smaller tiles and
# no pipelining. 64-token tiles waste 1.3x per axis on a 7x7 window (49 tokens).
_GPU_TILES = {"tf32": {16: (64, 8, 2), 32: (64, 8, 2), 64: (32, 4, 2), 128: (32, 4, 2)},
              "ieee": {16: (32, 4, 1), 32: (32, 4, 1), 64: (16, 4, 1), 128: (16, 4, 1)}}
_HEADS_PER_PROGRAM = 4
_PRECISIONS = {torch.float32: ("ieee", "tf32"), torch.float16: ("tf32",), torch.bfloat16: ("tf32",)}


def _head_dim_pad(hd: int) -> int:
    return max(16, triton.next_power_of_2(hd))


def _precision(dtype: torch.dtype) -> str:
    # float32 dots use TF32 tensor cores only where torch itself is allowed to (as F.linear does).
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


class _Geometry:
    """Launch arguments shared by the forward and both backward kernels."""

    def __init__(self, qkv: torch.Tensor, num_heads: int, win, shift, n_bias: int, regions: bool,
                 has_bias: bool, scale: float):
        bsz, h, w, c3 = qkv.shape
        self.c, self.heads = c3 // 3, num_heads
        self.hd = self.c // num_heads
        hp, wp, n_win, n_win_w = grid_dims(h, w, win)
        self.bsz, self.h, self.w, self.win, self.n_win = bsz, h, w, win, n_win
        n = win[0] * win[1]
        hdp = _head_dim_pad(self.hd)
        prec = _precision(qkv.dtype)
        block, self.warps, self.stages = _GPU_TILES[prec][hdp]
        interp = interpreting(_window_attn_fwd)
        if interp:  # the interpreter pays per element: tiny windows get tiny tiles there
            block = min(block, max(16, triton.next_power_of_2(n)))
        # Up to 4 heads per program (all of Swin-T/B's first stage): the program then uses whole
        # 128-byte lines of its tokens' q, k and v (4 heads x 32 channels x 2 bytes), and the
        # grid stays large enough to fill the GPU at the later stages' 8 to 32 heads.
        hpp = min(num_heads, _HEADS_PER_PROGRAM)
        self.grid = (bsz * n_win, triton.cdiv(num_heads, hpp), triton.cdiv(n, block))
        self.runtime = (h, w, n_win, n_win_w, shift[0], shift[1], hp, wp, n_bias, scale)
        self.shape = (self.c, num_heads, self.hd, win[0], win[1], int(regions), int(has_bias), hpp)
        self.const = dict(HDP=hdp, BLOCK=block, PREC=prec,
                          UPCAST=qkv.dtype == torch.bfloat16 and interp)

    def launch(self, kernel, pointers, qkv_strides, out_strides, flag: int):
        with device_guard(pointers[0].device):
            kernel[self.grid](*pointers, *self.runtime, *qkv_strides, *out_strides, *self.shape,
                              flag, **self.const, num_warps=self.warps, num_stages=self.stages)


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, bias, qkv_bias, mask, num_heads, win, shift, scale):
        qkv = qkv.contiguous() if ctx.needs_input_grad[0] or qkv.stride(-1) != 1 else qkv
        full = bias if mask is None else bias.unsqueeze(0) + mask.float().unsqueeze(1)
        full = full.contiguous()
        geo = _Geometry(qkv, num_heads, win, shift, 1 if mask is None else mask.shape[0],
                        mask is None and any(shift), qkv_bias is not None, scale)
        out = torch.empty(geo.bsz, geo.h, geo.w, geo.c, dtype=qkv.dtype, device=qkv.device)
        train = any(ctx.needs_input_grad[:3])
        lse = torch.empty((geo.bsz, geo.h, geo.w, num_heads) if train else (1,),
                          dtype=torch.float32, device=qkv.device)
        qkv_bias_arg = qkv_bias.to(qkv.dtype).contiguous() if qkv_bias is not None else qkv
        if out.numel():
            geo.launch(_window_attn_fwd, (qkv, full, qkv_bias_arg, out, lse),
                       qkv.stride()[:3], out.stride()[:3], int(train))
        if train:
            ctx.save_for_backward(qkv, full, qkv_bias_arg, out, lse)
            ctx.geo, ctx.bias_dtype = geo, None if qkv_bias is None else qkv_bias.dtype
        return out

    @staticmethod
    def backward(ctx, d_out):
        qkv, full, qkv_bias_arg, out, lse = ctx.saved_tensors
        geo = ctx.geo
        d_out = d_out.contiguous()
        # delta = rowsum(dO * O) per token and head: one pass, cheaper in torch than in a kernel
        delta = (d_out.float() * out.float()).view(*out.shape[:3], geo.heads, geo.hd).sum(-1)
        dqkv = torch.empty_like(qkv)
        want_bias, want_qkv_bias = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dbias = torch.zeros(full.shape if want_bias else (1,), dtype=torch.float32,
                            device=qkv.device)
        dqkv_bias = torch.zeros(qkv.shape[-1] if want_qkv_bias else 1, dtype=torch.float32,
                                device=qkv.device)
        if dqkv.numel():
            common = (qkv, full, qkv_bias_arg, d_out, lse, delta.contiguous(), dqkv)
            geo.launch(_window_attn_bwd_dkdv, (*common, dqkv_bias), qkv.stride()[:3],
                       d_out.stride()[:3], int(want_qkv_bias))
            geo.launch(_window_attn_bwd_dq, (*common, dbias), qkv.stride()[:3],
                       d_out.stride()[:3], int(want_bias))
        if want_bias and full.dim() == 4:  # the explicit mask was folded in: sum its windows
            dbias = dbias.sum(0)
        return (dqkv, dbias if want_bias else None,
                dqkv_bias.to(ctx.bias_dtype) if want_qkv_bias else None, None, None, None, None,
                None)


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
    win, shift = check_inputs(qkv_tokens, rel_pos_table, num_heads, window_size, shift_size,
                              qkv_bias, mask)
    check_runnable(_window_attn_fwd, qkv_tokens.device, "window_attention")
    hd = qkv_tokens.shape[-1] // (3 * num_heads)
    check_mask_count(mask, qkv_tokens.shape[0] * grid_dims(*qkv_tokens.shape[1:3], win)[2])
    bias = dense_position_bias(rel_pos_table, win)  # autograd carries its gradient to the table
    return _WindowAttention.apply(qkv_tokens, bias, qkv_bias,
                                  None if mask is None else mask.detach(), num_heads, win, shift,
                                  hd ** -0.5 if scale is None else float(scale))


def launch_configs() -> list:
    """Every compiled variant the window-attention kernels can be launched with on a GPU: per
    kernel, dtype (and float32 dot precision) and padded head dim; windows, heads, shifts and
    masks are runtime values."""
    ints = ("H W n_win n_win_w shift_h shift_w Hp Wp n_bias s_qb s_qh s_qw s_ob s_oh s_ow "
            "C HEADS HD WH WW regions has_bias heads_per_program").split()
    flags = {_window_attn_fwd: "store_lse", _window_attn_bwd_dkdv: "want_dqkv_bias",
             _window_attn_bwd_dq: "want_dbias"}
    out = []
    for dtype, precs in _PRECISIONS.items():
        types = {"qkv_ptr": pointer(dtype), "bias_ptr": "*fp32", "qkv_bias_ptr": pointer(dtype),
                 "out_ptr": pointer(dtype), "lse_ptr": "*fp32", "do_ptr": pointer(dtype),
                 "delta_ptr": "*fp32", "dqkv_ptr": pointer(dtype), "dqkv_bias_ptr": "*fp32",
                 "dbias_ptr": "*fp32", "scale": "fp32", **{k: "i32" for k in ints}}
        for kernel, flag in flags.items():
            for prec in precs:
                for hdp, (block, warps, stages) in _GPU_TILES[prec].items():
                    label = pointer(dtype)[1:] + (f"/{prec}" if dtype == torch.float32 else "")
                    name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
                    out.append(LaunchConfig.of(
                        kernel, f"{name.lstrip('_')} {label} head_dim<={hdp} block {block}",
                        {**types, flag: "i32"},
                        dict(HDP=hdp, BLOCK=block, PREC=prec, UPCAST=False), warps, stages))
    return out
