"""Fused Swin window attention forward, read from and written to the token map.

Input is the qkv projection of the un-partitioned token map, (B, H, W, 3*C) with channels laid
out as timm's (3, heads, head_dim); output is (B, H, W, C) with channels (heads, head_dim), ready
for the output projection. One program per (image, window, head):

- the cyclic shift and the window partition are index arithmetic: window token (y, x) of the
  shifted, padded grid reads token ((y + shift_h) % H, (x + shift_w) % W), and its output is
  written back to that same token, which is the reverse partition and reverse shift;
- grid positions past H or W (resolution not a multiple of the window) are timm's zero padding
  put through the qkv Linear, so their q, k, v are the qkv bias; their outputs are dropped;
- the relative-position bias is gathered from the (2*Wh-1)*(2*Ww-1) x heads table itself, by the
  index arithmetic of timm's ``get_relative_position_index``: nothing is precomputed or cached,
  so the kernel always sees the current parameter;
- the shifted-window mask is computed from the grid coordinates: timm's nine regions (three per
  shifted axis), -100 between tokens of different regions; alternatively an explicit additive
  mask (n_mask, N, N) is read, window ``(b * windows_per_image + w) % n_mask`` as in timm;
- the N = Wh*Ww tokens are padded to a power of two >= 16 (49 -> 64) for ``tl.dot``; padded
  keys get -inf, padded queries are never stored. Softmax runs in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import FLOAT_DTYPES, check_runnable, device_guard, interpreting, tl, triton

MASK_NEG = -100.0  # timm's value for tokens of different shifted-window regions


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    try:
        a, b = (int(t) for t in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    return a, b


@triton.jit
def _window_attn_fwd(qkv_ptr, table_ptr, qkv_bias_ptr, mask_ptr, out_ptr,
                     H, W, n_win, n_win_w, shift_h, shift_w, Hp, Wp, n_mask, scale,
                     s_qb, s_qh, s_qw, s_ob, s_oh, s_ow,
                     C: tl.constexpr, HEADS: tl.constexpr, HD: tl.constexpr, HDP: tl.constexpr,
                     WH: tl.constexpr, WW: tl.constexpr, NP: tl.constexpr,
                     MASK_MODE: tl.constexpr, HAS_QKV_BIAS: tl.constexpr, PREC: tl.constexpr,
                     UPCAST: tl.constexpr):
    pid = tl.program_id(0)  # image * n_win + window
    h = tl.program_id(1)
    b = (pid // n_win).to(tl.int64)
    win = pid % n_win
    N: tl.constexpr = WH * WW

    t = tl.arange(0, NP)
    valid = t < N
    ty = t // WW
    tx = t % WW
    y = (win // n_win_w) * WH + ty  # position in the shifted, padded grid
    x = (win % n_win_w) * WW + tx
    real = valid & (y < H) & (x < W)
    sy = (y + shift_h) % H
    sx = (x + shift_w) % W

    d = tl.arange(0, HDP)
    d_ok = d < HD
    ch = h * HD + d
    src = qkv_ptr + b * s_qb + sy.to(tl.int64) * s_qh + sx.to(tl.int64) * s_qw
    ld = real[:, None] & d_ok[None, :]
    q = tl.load(src[:, None] + ch[None, :], mask=ld, other=0.0)
    k = tl.load(src[:, None] + (C + ch)[None, :], mask=ld, other=0.0)
    v = tl.load(src[:, None] + (2 * C + ch)[None, :], mask=ld, other=0.0)
    if HAS_QKV_BIAS:
        pad = (valid & ~real)[:, None] & d_ok[None, :]
        q = tl.where(pad, tl.load(qkv_bias_ptr + ch, mask=d_ok, other=0.0)[None, :], q)
        k = tl.where(pad, tl.load(qkv_bias_ptr + C + ch, mask=d_ok, other=0.0)[None, :], k)
        v = tl.where(pad, tl.load(qkv_bias_ptr + 2 * C + ch, mask=d_ok, other=0.0)[None, :], v)
    # timm scales q in its own dtype before the product; so do we.
    q = (q.to(tl.float32) * scale).to(v.dtype)
    if UPCAST:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)

    pair = valid[:, None] & valid[None, :]
    rel = (ty[:, None] - ty[None, :] + (WH - 1)) * (2 * WW - 1) + (tx[:, None] - tx[None, :] + (WW - 1))
    s += tl.load(table_ptr + rel * HEADS + h, mask=pair, other=0.0).to(tl.float32)
    if MASK_MODE == 1:
        # Region of a grid row: [0, Hp-WH), [Hp-WH, Hp-shift), [Hp-shift, Hp); one region when
        # that axis is not shifted (timm's slices then overwrite the whole axis with the last).
        rh = tl.where(y < Hp - WH, 0, tl.where(y < Hp - shift_h, 1, 2))
        rh = tl.where(shift_h > 0, rh, 0)
        rw = tl.where(x < Wp - WW, 0, tl.where(x < Wp - shift_w, 1, 2))
        rw = tl.where(shift_w > 0, rw, 0)
        reg = rh * 3 + rw
        s += tl.where(reg[:, None] != reg[None, :], -100.0, 0.0)
    elif MASK_MODE == 2:
        mi = (pid % n_mask).to(tl.int64)
        s += tl.load(mask_ptr + mi * (N * N) + t[:, None] * N + t[None, :], mask=pair,
                     other=0.0).to(tl.float32)
    s = tl.where(valid[None, :], s, float("-inf"))

    m = tl.max(s, 1)
    p = tl.exp(s - m[:, None])
    p = p / tl.sum(p, 1)[:, None]
    if UPCAST:
        o = tl.dot(p, v.to(tl.float32), input_precision=PREC)
    else:
        o = tl.dot(p.to(v.dtype), v, input_precision=PREC)

    dst = out_ptr + b * s_ob + sy.to(tl.int64) * s_oh + sx.to(tl.int64) * s_ow
    tl.store(dst[:, None] + ch[None, :], o.to(out_ptr.dtype.element_ty), mask=ld)


def _check_inputs(qkv_tokens, rel_pos_table, num_heads, window_size, shift_size, qkv_bias, mask):
    if not isinstance(qkv_tokens, torch.Tensor) or qkv_tokens.dim() != 4:
        raise ValueError("qkv_tokens must be a (B, H, W, 3*C) tensor: the qkv Linear of the token map")
    if qkv_tokens.dtype not in FLOAT_DTYPES:
        raise ValueError(f"qkv_tokens must be float32, float16 or bfloat16, got {qkv_tokens.dtype}")
    wh, ww = _pair(window_size, "window_size")
    sh, sw = _pair(shift_size, "shift_size")
    c3 = qkv_tokens.shape[-1]
    if num_heads < 1 or c3 % (3 * num_heads):
        raise ValueError(f"the last dim {c3} must be 3 * num_heads * head_dim (num_heads={num_heads})")
    if wh < 1 or ww < 1 or not (0 <= sh < wh and 0 <= sw < ww):
        raise ValueError(f"need window >= 1 and 0 <= shift < window, got window {(wh, ww)}, "
                         f"shift {(sh, sw)}")
    t_rows = (2 * wh - 1) * (2 * ww - 1)
    if rel_pos_table.shape != (t_rows, num_heads):
        raise ValueError(f"rel_pos_table must be ({t_rows}, {num_heads}) for a {wh}x{ww} window, "
                         f"got {tuple(rel_pos_table.shape)}")
    if qkv_bias is not None and qkv_bias.shape != (c3,):
        raise ValueError(f"qkv_bias must be ({c3},), got {tuple(qkv_bias.shape)}")
    others = [t for t in (rel_pos_table, qkv_bias, mask) if t is not None]
    if any(t.device != qkv_tokens.device for t in others):
        raise ValueError(f"qkv_tokens is on {qkv_tokens.device}: the table, qkv_bias and mask "
                         "must be there too")
    if mask is not None:
        n = wh * ww
        if mask.dim() != 3 or mask.shape[1:] != (n, n):
            raise ValueError(f"mask must be (num_windows, {n}, {n}), got {tuple(mask.shape)}")
    return (wh, ww), (sh, sw)


def _grid_dims(h, w, win):
    """(padded H, padded W, windows per image, windows per grid row)."""
    wh, ww = win
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    return hp, wp, (hp // wh) * (wp // ww), wp // ww


def _check_mask_count(mask, windows: int) -> None:
    if mask is not None and (mask.shape[0] < 1 or windows % mask.shape[0]):
        raise ValueError(f"mask has {mask.shape[0]} windows, which must divide the {windows} "
                         "windows of the batch (window i uses mask i % num_windows)")


def window_attention(qkv_tokens: torch.Tensor, rel_pos_table: torch.Tensor, num_heads: int,
                     window_size, shift_size=0, *, qkv_bias: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Swin (shifted-)window attention of a token map, fused (Triton); returns (B, H, W, C).

    ``qkv_tokens`` (B, H, W, 3*C): the qkv Linear applied to the token map, before any roll or
    partition. ``rel_pos_table``: timm's ``relative_position_bias_table``. ``qkv_bias``: the qkv
    Linear's bias, the q/k/v of the zero padding when H or W is not a multiple of the window.
    ``mask``: None for timm's shifted-window mask (computed in the kernel when a shift is
    nonzero), or an explicit additive (n_mask, N, N) mask used instead. ``scale`` defaults to
    head_dim ** -0.5.
    """
    win, shift = _check_inputs(qkv_tokens, rel_pos_table, num_heads, window_size, shift_size,
                               qkv_bias, mask)
    check_runnable(_window_attn_fwd, qkv_tokens.device, "window_attention")
    bsz, h, w, c3 = qkv_tokens.shape
    c = c3 // 3
    hd = c // num_heads
    scale = hd ** -0.5 if scale is None else float(scale)
    if qkv_tokens.stride(-1) != 1:
        qkv_tokens = qkv_tokens.contiguous()
    table = rel_pos_table.detach().contiguous()
    hp, wp, n_win, n_win_w = _grid_dims(h, w, win)
    _check_mask_count(mask, bsz * n_win)
    out = torch.empty(bsz, h, w, c, dtype=qkv_tokens.dtype, device=qkv_tokens.device)
    if out.numel() == 0:
        return out
    if mask is not None:
        mask_mode, mask_arg, n_mask = 2, mask.detach().contiguous(), mask.shape[0]
    else:
        mask_mode, mask_arg, n_mask = (1 if any(shift) else 0), table, 1
    bias_arg = qkv_bias.detach().to(qkv_tokens.dtype).contiguous() if qkv_bias is not None else table
    n = win[0] * win[1]
    n_pad = max(16, triton.next_power_of_2(n))
    hd_pad = max(16, triton.next_power_of_2(hd))
    dt = qkv_tokens.dtype
    prec = "ieee" if dt == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"
    with device_guard(qkv_tokens.device):
        _window_attn_fwd[(bsz * n_win, num_heads)](
            qkv_tokens, table, bias_arg, mask_arg, out,
            h, w, n_win, n_win_w, shift[0], shift[1], hp, wp, n_mask, scale,
            qkv_tokens.stride(0), qkv_tokens.stride(1), qkv_tokens.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            C=c, HEADS=num_heads, HD=hd, HDP=hd_pad, WH=win[0], WW=win[1], NP=n_pad,
            MASK_MODE=mask_mode, HAS_QKV_BIAS=qkv_bias is not None, PREC=prec,
            UPCAST=dt == torch.bfloat16 and interpreting(_window_attn_fwd),
            num_warps=4 if n_pad <= 64 else 8,
        )
    return out


# ---- plain-torch reference: roll, pad, partition, timm's attention, reverse, unroll ----

def relative_position_index(wh: int, ww: int, device=None) -> torch.Tensor:
    """(N, N) index into the bias table, as timm's ``get_relative_position_index``."""
    ys, xs = torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device),
                            indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # 2, N
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def shifted_window_mask(hp: int, wp: int, window_size, shift_size, device=None,
                        dtype=torch.float32) -> torch.Tensor:
    """(num_windows, N, N) additive mask of timm's ``get_attn_mask`` for a padded hp x wp grid."""
    (wh, ww), (sh, sw) = _pair(window_size, "window_size"), _pair(shift_size, "shift_size")
    img = torch.zeros(1, hp, wp, 1, device=device, dtype=dtype)
    cnt = 0
    for hs in ((0, -wh), (-wh, -sh), (-sh, None)):
        for ws in ((0, -ww), (-ww, -sw), (-sw, None)):
            img[:, hs[0]:hs[1], ws[0]:ws[1], :] = cnt
            cnt += 1
    win = _partition(img, wh, ww).view(-1, wh * ww)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, MASK_NEG).masked_fill(diff == 0, 0.0)


def _partition(x, wh, ww):
    b, h, w, c = x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh, ww, c)


def _reverse(windows, wh, ww, h, w):
    c = windows.shape[-1]
    x = windows.view(-1, h // wh, w // ww, wh, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def window_attention_reference(qkv_tokens: torch.Tensor, rel_pos_table: torch.Tensor,
                               num_heads: int, window_size, shift_size=0, *,
                               qkv_bias: torch.Tensor | None = None,
                               mask: torch.Tensor | None = None,
                               scale: float | None = None) -> torch.Tensor:
    """Plain-torch window_attention: timm's roll / pad / partition / attention / reverse path."""
    (wh, ww), (sh, sw) = _check_inputs(qkv_tokens, rel_pos_table, num_heads, window_size,
                                       shift_size, qkv_bias, mask)
    bsz, h, w, c3 = qkv_tokens.shape
    c = c3 // 3
    hd = c // num_heads
    scale = hd ** -0.5 if scale is None else scale
    x = qkv_tokens
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    hp, wp, n_win, _ = _grid_dims(h, w, (wh, ww))
    _check_mask_count(mask, bsz * n_win)
    x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
    if qkv_bias is not None and (hp > h or wp > w):
        pad = torch.ones(hp, wp, dtype=torch.bool, device=x.device)
        pad[:h, :w] = False
        x = torch.where(pad[None, :, :, None], qkv_bias.to(x.dtype), x)
    n = wh * ww
    windows = _partition(x, wh, ww).view(-1, n, c3)
    qkv = windows.reshape(-1, n, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = (q * scale) @ k.transpose(-2, -1)
    idx = relative_position_index(wh, ww, device=x.device)
    attn = attn + rel_pos_table[idx.view(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
    if mask is None and (sh or sw):
        mask = shifted_window_mask(hp, wp, (wh, ww), (sh, sw), device=x.device, dtype=attn.dtype)
    if mask is not None:
        nm = mask.shape[0]
        attn = attn.view(-1, nm, num_heads, n, n) + mask.to(attn.dtype).unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, n, n)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, c)
    out = _reverse(out.view(-1, wh, ww, c), wh, ww, hp, wp)[:, :h, :w, :]
    if sh or sw:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out.contiguous()
