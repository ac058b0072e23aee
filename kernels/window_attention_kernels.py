"""The Triton kernels of the fused Swin window attention: forward, and the backward passes.

All read q, k and v straight from the qkv projection of the un-partitioned token map
(B, H, W, 3*C), channels laid out as timm's (3, heads, head_dim), and address window tokens by
index arithmetic (see window_attention.py). The relative-position bias, the shifted-window
regions (or an explicit mask) and the padding of a window to whole BLOCKs are folded beforehand
into one float32 tile per (mask class, head), stored as NB x NB contiguous (BLOCK, BLOCK) pieces
with -inf in the padding columns: a program adds its piece with one unmasked contiguous load.

Programs are numbered with the query (or key) block fastest, then the head group, then the
window, so the programs of one window run side by side and share its k and v through L2.

- forward: a query block, keys visited with an online softmax (running maximum and sum in
  float32); of a window's last key block only TAIL keys (what is left of the window, to a power
  of two), visited first so their loads go out with q's; it also stores each query's
  log-sum-exp when a backward will follow; its key-block loop runs over KV_STAGES pipeline
  stages (window_attention_settings.kv_prefetch: 1, or 3 to keep the next blocks in flight);
- backward (window_attention_backward_kernels.py): dQ, dK, dV and the bias gradient
  (FlashAttention-2's backward with Swin's bias tile).
"""

from __future__ import annotations

from ._common import HAVE_TRITON, tl, triton

# Softmax in base 2: exp2 compiles to one MUFU.EX2 (ftz), exp to four more instructions around it
# (a log2(e) multiply and the denormal fix-up).
LOG2E = tl.constexpr(1.4426950408889634) if HAVE_TRITON else 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453) if HAVE_TRITON else 0.6931471805599453


@triton.jit
def _window_of(wid, n_win, n_win_w, n_win_h, WH, WW, n_mask, cls_h, cls_w):
    """Image, corner in the shifted padded grid and mask class of window ``wid`` (image * n_win
    + window). Classes: the explicit mask's window ``wid % n_mask``, or timm's shifted-window
    regions, which differ only in the last window row (cls_h) and column (cls_w)."""
    b = (wid // n_win).to(tl.int64)
    win = wid % n_win
    wr = win // n_win_w
    wc = win % n_win_w
    cls = (wid % n_mask + 2 * cls_h * (wr == n_win_h - 1).to(tl.int32)
           + cls_w * (wc == n_win_w - 1).to(tl.int32))
    return b, wr * WH, wc * WW, cls


@triton.jit
def _tokens(t0, N, WW, wy0, wx0, H, W, shift_h, shift_w, BLOCK: tl.constexpr, PAD: tl.constexpr):
    """BLOCK window tokens from t0: inside the window, inside the image (not timm's zero
    padding), and the row and column of the (cyclically shifted) token they read."""
    t = t0 + tl.arange(0, BLOCK)
    valid = t < N
    # t // WW through float32 (an integer division by a runtime value is some 20 instructions an
    # element): exact, as (t + 0.5) / WW lies 0.5 / WW or more from any integer and float32's
    # relative error here, 2**-22, keeps it there for any t below 2**21.
    row = ((t.to(tl.float32) + 0.5) * (1.0 / WW)).to(tl.int32)
    y = wy0 + row
    x = wx0 + (t - row * WW)
    if PAD:
        real = valid & (y < H) & (x < W)
    else:
        real = valid
    # The modulo as one conditional subtraction: a real token's y + shift_h is below H + WH <= 2H
    # (timm's window never exceeds the map); other tokens' rows are never dereferenced.
    sy = y + shift_h
    sx = x + shift_w
    sy = tl.where(sy >= H, sy - H, sy)
    sx = tl.where(sx >= W, sx - W, sx)
    return valid, real, sy.to(tl.int64), sx.to(tl.int64)


@triton.jit
def _load_rows(ptr, rows, ch, valid, real, d_ok, bias_ptr, PAD: tl.constexpr,
               EVEN_D: tl.constexpr):
    """A (tokens, HDP) tile at ``ptr + rows + ch``; with PAD, timm's zero-padding tokens read
    the qkv bias (their qkv Linear output)."""
    if EVEN_D:
        m = real[:, None]
    else:
        m = real[:, None] & d_ok[None, :]
    x = tl.load(ptr + rows[:, None] + ch[None, :], mask=m, other=0.0)
    if PAD:
        pad = (valid & ~real)[:, None] & d_ok[None, :]
        x = tl.where(pad, tl.load(bias_ptr + ch[None, :], mask=pad, other=0.0), x)
    return x


@triton.jit
def _scaled_q(q, scale, UPCAST: tl.constexpr):
    # timm scales q in its own dtype before the product
    q = (q.to(tl.float32) * scale).to(q.dtype)
    if UPCAST:
        q = q.to(tl.float32)
    return q


@triton.jit
def _up(x, UPCAST: tl.constexpr):
    # The interpreter keeps bfloat16 as raw bits; a GPU never takes this branch.
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _key_block(acc, m_i, l_i, q, qkv_ptr, qkv_bias_ptr, tile_h, kb, b, ch, d_ok, N, WW, wy0, wx0,
               H, W, shift_h, shift_w, s_qb, s_qh, s_qw, C, BLOCK: tl.constexpr,
               KEYS: tl.constexpr, PAD: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
               UPCAST: tl.constexpr):
    """One online-softmax step over the first KEYS keys of key block ``kb``: the running
    accumulator, maximum and sum, updated."""
    k_valid, k_real, syk, sxk = _tokens(kb * BLOCK, N, WW, wy0, wx0, H, W, shift_h, shift_w, KEYS,
                                        PAD)
    k_rows = b * s_qb + syk * s_qh + sxk * s_qw
    k = _up(_load_rows(qkv_ptr + C, k_rows, ch, k_valid, k_real, d_ok, qkv_bias_ptr + C, PAD,
                       EVEN_D), UPCAST)
    v = _up(_load_rows(qkv_ptr + 2 * C, k_rows, ch, k_valid, k_real, d_ok, qkv_bias_ptr + 2 * C,
                       PAD, EVEN_D), UPCAST)
    bias = tl.load(tile_h + kb * (BLOCK * BLOCK) + tl.arange(0, BLOCK)[:, None] * BLOCK
                   + tl.arange(0, KEYS)[None, :])
    s = tl.dot(q, tl.trans(k), input_precision=PREC) + bias
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2((m_i - m_new) * LOG2E)
    p = tl.math.exp2(s * LOG2E - (m_new * LOG2E)[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _window_attn_fwd(qkv_ptr, tile_ptr, qkv_bias_ptr, out_ptr, lse_ptr,
                     H, W, n_win, n_win_w, n_win_h, shift_h, shift_w, n_mask, cls_h, cls_w,
                     scale, s_qb, s_qh, s_qw, s_ob, s_oh, s_ow,
                     C, HEADS, HD, WH, WW, heads_per_program, n_groups, store_lse,
                     HDP: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr,
                     TAIL: tl.constexpr, PAD: tl.constexpr, EVEN_D: tl.constexpr,
                     PREC: tl.constexpr, UPCAST: tl.constexpr, KV_STAGES: tl.constexpr):
    pid = tl.program_id(0)
    qb = pid % NB
    g = (pid // NB) % n_groups
    wid = pid // (NB * n_groups)
    N = WH * WW
    b, wy0, wx0, cls = _window_of(wid, n_win, n_win_w, n_win_h, WH, WW, n_mask, cls_h, cls_w)
    # Token arithmetic once per program: every head reads the same rows.
    valid, real, sy, sx = _tokens(qb * BLOCK, N, WW, wy0, wx0, H, W, shift_h, shift_w, BLOCK, PAD)
    q_rows = b * s_qb + sy * s_qh + sx * s_qw
    o_rows = b * s_ob + sy * s_oh + sx * s_ow
    lse_rows = ((b * H + sy) * W + sx) * HEADS
    d = tl.arange(0, HDP)
    d_ok = d < HD
    r = tl.arange(0, BLOCK)
    piece = BLOCK * BLOCK
    # this program's row of (BLOCK, BLOCK) pieces in the tile of (class, head 0)
    tile_row = tile_ptr + (cls * HEADS).to(tl.int64) * (NB * NB * piece) + qb * (NB * piece)
    h0 = g * heads_per_program
    for h in range(h0, tl.minimum(h0 + heads_per_program, HEADS)):
        ch = h * HD + d
        q = _scaled_q(_load_rows(qkv_ptr, q_rows, ch, valid, real, d_ok, qkv_bias_ptr, PAD,
                                 EVEN_D), scale, UPCAST)
        tile_h = tile_row + h * (NB * NB * piece)
        if NB == 1:
            # The window is one block: its keys are its queries; no running maximum needed.
            k = _up(_load_rows(qkv_ptr + C, q_rows, ch, valid, real, d_ok, qkv_bias_ptr + C,
                               PAD, EVEN_D), UPCAST)
            v = _up(_load_rows(qkv_ptr + 2 * C, q_rows, ch, valid, real, d_ok,
                               qkv_bias_ptr + 2 * C, PAD, EVEN_D), UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) \
                + tl.load(tile_h + r[:, None] * BLOCK + r[None, :])
            m_i = tl.max(s, 1)
            p = tl.math.exp2(s * LOG2E - (m_i * LOG2E)[:, None])
            l_i = tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, input_precision=PREC)
        else:
            m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK,), tl.float32)
            acc = tl.zeros((BLOCK, HDP), tl.float32)
            if TAIL == BLOCK:
                for kb in tl.range(NB, num_stages=KV_STAGES):
                    acc, m_i, l_i = _key_block(acc, m_i, l_i, q, qkv_ptr, qkv_bias_ptr, tile_h,
                                               kb, b, ch, d_ok, N, WW, wy0, wx0, H, W, shift_h,
                                               shift_w, s_qb, s_qh, s_qw, C, BLOCK, BLOCK, PAD,
                                               EVEN_D, PREC, UPCAST)
            else:
                # the last block holds N - (NB - 1) * BLOCK keys: only TAIL columns of it are
                # visited, first, so that their loads go out with q's
                acc, m_i, l_i = _key_block(acc, m_i, l_i, q, qkv_ptr, qkv_bias_ptr, tile_h,
                                           NB - 1, b, ch, d_ok, N, WW, wy0, wx0, H, W, shift_h,
                                           shift_w, s_qb, s_qh, s_qw, C, BLOCK, TAIL, PAD, EVEN_D,
                                           PREC, UPCAST)
                for kb in tl.range(NB - 1, num_stages=KV_STAGES):
                    acc, m_i, l_i = _key_block(acc, m_i, l_i, q, qkv_ptr, qkv_bias_ptr, tile_h,
                                               kb, b, ch, d_ok, N, WW, wy0, wx0, H, W, shift_h,
                                               shift_w, s_qb, s_qh, s_qw, C, BLOCK, BLOCK, PAD,
                                               EVEN_D, PREC, UPCAST)
        o = acc * (1.0 / l_i)[:, None]
        if EVEN_D:
            st = real[:, None]
        else:
            st = real[:, None] & d_ok[None, :]
        tl.store(out_ptr + o_rows[:, None] + ch[None, :], o.to(out_ptr.dtype.element_ty), mask=st)
        if store_lse != 0:
            tl.store(lse_ptr + lse_rows + h, m_i + tl.math.log2(l_i) * LN2, mask=real)
