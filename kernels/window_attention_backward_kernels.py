"""The Triton kernels of the fused window attention's backward (FlashAttention-2's, with Swin's
bias tile): P is recomputed from the forward's log-sum-exp, dV = P^T dO, dS = P * (dO V^T -
delta) with delta = rowsum(dO * O) computed here from O and dO, dQ = scale * dS K,
dK = dS^T (q * scale), and the bias gradient is dS summed over every window and image.

Atomics are relaxed (red.global.add, no fence): the sums they build are read only after the
kernel ends. Padding tokens (resolution not a multiple of the window) read the qkv bias; their
dK and dV are summed into the qkv bias's gradient. Padding queries have no output, hence no
gradient.

- ``_window_attn_bwd_one``: windows of one block (N <= BLOCK, Swin's 7x7): a program owns one
  head of a run of windows and does all of dQ, dK and dV for each; the bias gradient (and the
  qkv bias's) is summed over its windows in registers and flushed once;
- ``_window_attn_bwd_dq`` then ``_window_attn_bwd_dkdv``: larger windows, one (window, head
  group, block) per program: the first also stores delta for the others. With DBIAS the dQ
  kernel adds each (window, key block)'s dS into the bias gradient (relaxed atomics: ~1.2 GB
  into L2 per backward of Swin-B's 12x12 stage 1 at batch 128, on 147k addresses);
- ``_window_attn_bwd_dbias``, the other way to the bias gradient of larger windows: a program
  owns one (head, query block, key block) piece of the tile over a run of windows, recomputes dS
  there and sums it in registers, flushing once. (Summing inside the dQ kernel takes a (BLOCK,
  BLOCK) float32 accumulator per key block on top of dQ's body: 255 registers and spills on
  sm_90 at 12x12.) It repeats half the dQ kernel's work, so it wins only if the atomics cost
  more than that; which one runs is ``window_attention_settings.bias_grad``.
"""

from __future__ import annotations

from ._common import tl, triton
from .window_attention_kernels import LOG2E, _load_rows, _scaled_q, _tokens, _up, _window_of


@triton.jit
def _query_block(qkv_ptr, qkv_bias_ptr, do_ptr, lse_ptr, delta_ptr, t0, b, wy0, wx0, h, ch, d_ok,
                 N, H, W, WW, shift_h, shift_w, scale, s_qb, s_qh, s_qw, s_ob, s_oh, s_ow, HEADS,
                 BLOCK: tl.constexpr, PAD: tl.constexpr, EVEN_D: tl.constexpr,
                 UPCAST: tl.constexpr):
    """A query block's side of dS for head ``h``: which rows are real tokens, scaled q, dO,
    and the log-sum-exp and delta the dQ kernel left."""
    valid, real, sy, sx = _tokens(t0, N, WW, wy0, wx0, H, W, shift_h, shift_w, BLOCK, PAD)
    tok = ((b * H + sy) * W + sx) * HEADS + h
    q = _scaled_q(_load_rows(qkv_ptr, b * s_qb + sy * s_qh + sx * s_qw, ch, valid, real, d_ok,
                             qkv_bias_ptr, PAD, EVEN_D), scale, UPCAST)
    do = _up(_load_rows(do_ptr, b * s_ob + sy * s_oh + sx * s_ow, ch, valid, real, d_ok, do_ptr,
                        False, EVEN_D), UPCAST)
    lse = tl.load(lse_ptr + tok, mask=real, other=0.0)
    delta = tl.load(delta_ptr + tok, mask=real, other=0.0)
    return real, q, do, lse, delta


@triton.jit
def _window_attn_bwd_one(qkv_ptr, tile_ptr, qkv_bias_ptr, out_ptr, do_ptr, lse_ptr,
                         dqkv_ptr, dtile_ptr, dqkv_bias_ptr,
                         H, W, n_win, n_win_w, n_win_h, shift_h, shift_w, n_mask, cls_h, cls_w,
                         scale, s_qb, s_qh, s_qw, s_ob, s_oh, s_ow,
                         C, HEADS, HD, WH, WW, n_windows, windows_per_program, want_dbias,
                         want_dqkv_bias,
                         HDP: tl.constexpr, BLOCK: tl.constexpr, PAD: tl.constexpr,
                         EVEN_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    h = pid % HEADS  # the heads of a run of windows are neighbours: they share its lines in L2
    w0 = (pid // HEADS) * windows_per_program
    N = WH * WW
    d = tl.arange(0, HDP)
    d_ok = d < HD
    ch = h * HD + d
    r = tl.arange(0, BLOCK)
    local = r[:, None] * BLOCK + r[None, :]
    tile_h = tile_ptr + h * (BLOCK * BLOCK) + local
    dbias = tl.zeros((BLOCK, BLOCK), tl.float32)
    dk_pad = tl.zeros((HDP,), tl.float32)
    dv_pad = tl.zeros((HDP,), tl.float32)
    for wid in range(w0, tl.minimum(w0 + windows_per_program, n_windows)):
        b, wy0, wx0, cls = _window_of(wid, n_win, n_win_w, n_win_h, WH, WW, n_mask, cls_h, cls_w)
        valid, real, sy, sx = _tokens(0, N, WW, wy0, wx0, H, W, shift_h, shift_w, BLOCK, PAD)
        rows = b * s_qb + sy * s_qh + sx * s_qw
        o_rows = b * s_ob + sy * s_oh + sx * s_ow
        q = _scaled_q(_load_rows(qkv_ptr, rows, ch, valid, real, d_ok, qkv_bias_ptr, PAD,
                                 EVEN_D), scale, UPCAST)
        k = _up(_load_rows(qkv_ptr + C, rows, ch, valid, real, d_ok, qkv_bias_ptr + C, PAD,
                           EVEN_D), UPCAST)
        v = _up(_load_rows(qkv_ptr + 2 * C, rows, ch, valid, real, d_ok, qkv_bias_ptr + 2 * C,
                           PAD, EVEN_D), UPCAST)
        o = _load_rows(out_ptr, o_rows, ch, valid, real, d_ok, out_ptr, False, EVEN_D)
        do = _up(_load_rows(do_ptr, o_rows, ch, valid, real, d_ok, do_ptr, False, EVEN_D), UPCAST)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        lse = tl.load(lse_ptr + ((b * H + sy) * W + sx) * HEADS + h, mask=real, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) \
            + tl.load(tile_h + (cls * HEADS).to(tl.int64) * (BLOCK * BLOCK))
        p = tl.where(real[:, None], tl.math.exp2(s * LOG2E - (lse * LOG2E)[:, None]), 0.0)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC) * scale
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        dbias += ds
        if EVEN_D:
            st = real[:, None]
        else:
            st = real[:, None] & d_ok[None, :]
        dst = dqkv_ptr + rows[:, None] + ch[None, :]
        tl.store(dst, dq.to(dqkv_ptr.dtype.element_ty), mask=st)
        tl.store(dst + C, dk.to(dqkv_ptr.dtype.element_ty), mask=st)
        tl.store(dst + 2 * C, dv.to(dqkv_ptr.dtype.element_ty), mask=st)
        if PAD:
            pad = (valid & ~real)[:, None]
            dk_pad += tl.sum(tl.where(pad, dk, 0.0), 0)
            dv_pad += tl.sum(tl.where(pad, dv, 0.0), 0)
    tl.atomic_add(dtile_ptr + h * (BLOCK * BLOCK) + local, dbias, mask=(want_dbias != 0) & (local >= 0),
                  sem="relaxed")
    if PAD:
        ok = d_ok & (want_dqkv_bias != 0)
        tl.atomic_add(dqkv_bias_ptr + C + ch, dk_pad, mask=ok, sem="relaxed")
        tl.atomic_add(dqkv_bias_ptr + 2 * C + ch, dv_pad, mask=ok, sem="relaxed")


@triton.jit
def _window_attn_bwd_dq(qkv_ptr, tile_ptr, qkv_bias_ptr, out_ptr, do_ptr, lse_ptr, delta_ptr,
                        dqkv_ptr, dtile_ptr,
                        H, W, n_win, n_win_w, n_win_h, shift_h, shift_w, n_mask, cls_h, cls_w,
                        scale, s_qb, s_qh, s_qw, s_ob, s_oh, s_ow,
                        C, HEADS, HD, WH, WW, heads_per_program, n_groups,
                        HDP: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr,
                        PAD: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
                        UPCAST: tl.constexpr, DBIAS: tl.constexpr):
    pid = tl.program_id(0)
    qb = pid % NB
    g = (pid // NB) % n_groups
    wid = pid // (NB * n_groups)
    N = WH * WW
    b, wy0, wx0, cls = _window_of(wid, n_win, n_win_w, n_win_h, WH, WW, n_mask, cls_h, cls_w)
    valid, real, sy, sx = _tokens(qb * BLOCK, N, WW, wy0, wx0, H, W, shift_h, shift_w, BLOCK, PAD)
    q_rows = b * s_qb + sy * s_qh + sx * s_qw
    o_rows = b * s_ob + sy * s_oh + sx * s_ow
    tok = ((b * H + sy) * W + sx) * HEADS
    d = tl.arange(0, HDP)
    d_ok = d < HD
    r = tl.arange(0, BLOCK)
    piece = BLOCK * BLOCK
    local = r[:, None] * BLOCK + r[None, :]
    h0 = g * heads_per_program
    for h in range(h0, tl.minimum(h0 + heads_per_program, HEADS)):
        ch = h * HD + d
        q = _scaled_q(_load_rows(qkv_ptr, q_rows, ch, valid, real, d_ok, qkv_bias_ptr, PAD,
                                 EVEN_D), scale, UPCAST)
        o = _load_rows(out_ptr, o_rows, ch, valid, real, d_ok, out_ptr, False, EVEN_D)
        do = _up(_load_rows(do_ptr, o_rows, ch, valid, real, d_ok, do_ptr, False, EVEN_D), UPCAST)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(delta_ptr + tok + h, delta, mask=real)
        lse = tl.load(lse_ptr + tok + h, mask=real, other=0.0)
        row = qb * (NB * piece) + local
        tile_h = tile_ptr + (cls * HEADS + h).to(tl.int64) * (NB * NB * piece) + row
        dtile_h = dtile_ptr + h * (NB * NB * piece) + row
        dq = tl.zeros((BLOCK, HDP), tl.float32)
        for kb in range(NB):
            k_valid, k_real, syk, sxk = _tokens(kb * BLOCK, N, WW, wy0, wx0, H, W, shift_h,
                                                shift_w, BLOCK, PAD)
            k_rows = b * s_qb + syk * s_qh + sxk * s_qw
            k = _up(_load_rows(qkv_ptr + C, k_rows, ch, k_valid, k_real, d_ok, qkv_bias_ptr + C,
                               PAD, EVEN_D), UPCAST)
            v = _up(_load_rows(qkv_ptr + 2 * C, k_rows, ch, k_valid, k_real, d_ok,
                               qkv_bias_ptr + 2 * C, PAD, EVEN_D), UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) + tl.load(tile_h + kb * piece)
            p = tl.where(real[:, None], tl.math.exp2(s * LOG2E - (lse * LOG2E)[:, None]), 0.0)
            ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
            if DBIAS:
                tl.atomic_add(dtile_h + kb * piece, ds, sem="relaxed")
        if EVEN_D:
            st = real[:, None]
        else:
            st = real[:, None] & d_ok[None, :]
        tl.store(dqkv_ptr + q_rows[:, None] + ch[None, :], (dq * scale).to(dqkv_ptr.dtype.element_ty),
                 mask=st)


@triton.jit
def _window_attn_bwd_dkdv(qkv_ptr, tile_ptr, qkv_bias_ptr, do_ptr, lse_ptr, delta_ptr,
                          dqkv_ptr, dqkv_bias_ptr,
                          H, W, n_win, n_win_w, n_win_h, shift_h, shift_w, n_mask, cls_h, cls_w,
                          scale, s_qb, s_qh, s_qw, s_ob, s_oh, s_ow,
                          C, HEADS, HD, WH, WW, heads_per_program, n_groups, want_dqkv_bias,
                          HDP: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr,
                          PAD: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
                          UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    kb = pid % NB
    g = (pid // NB) % n_groups
    wid = pid // (NB * n_groups)
    N = WH * WW
    b, wy0, wx0, cls = _window_of(wid, n_win, n_win_w, n_win_h, WH, WW, n_mask, cls_h, cls_w)
    k_valid, k_real, syk, sxk = _tokens(kb * BLOCK, N, WW, wy0, wx0, H, W, shift_h, shift_w,
                                        BLOCK, PAD)
    k_rows = b * s_qb + syk * s_qh + sxk * s_qw
    d = tl.arange(0, HDP)
    d_ok = d < HD
    r = tl.arange(0, BLOCK)
    piece = BLOCK * BLOCK
    local = r[:, None] * BLOCK + r[None, :]
    pad = (k_valid & ~k_real)[:, None]
    h0 = g * heads_per_program
    for h in range(h0, tl.minimum(h0 + heads_per_program, HEADS)):
        ch = h * HD + d
        k = _up(_load_rows(qkv_ptr + C, k_rows, ch, k_valid, k_real, d_ok, qkv_bias_ptr + C,
                           PAD, EVEN_D), UPCAST)
        v = _up(_load_rows(qkv_ptr + 2 * C, k_rows, ch, k_valid, k_real, d_ok,
                           qkv_bias_ptr + 2 * C, PAD, EVEN_D), UPCAST)
        tile_h = tile_ptr + (cls * HEADS + h).to(tl.int64) * (NB * NB * piece) + kb * piece + local
        dk = tl.zeros((BLOCK, HDP), tl.float32)
        dv = tl.zeros((BLOCK, HDP), tl.float32)
        for qb in range(NB):
            real, q, do, lse, delta = _query_block(
                qkv_ptr, qkv_bias_ptr, do_ptr, lse_ptr, delta_ptr, qb * BLOCK, b, wy0, wx0, h, ch,
                d_ok, N, H, W, WW, shift_h, shift_w, scale, s_qb, s_qh, s_qw, s_ob, s_oh, s_ow,
                HEADS, BLOCK, PAD, EVEN_D, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) + tl.load(tile_h + qb * (NB * piece))
            p = tl.where(real[:, None], tl.math.exp2(s * LOG2E - (lse * LOG2E)[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        if EVEN_D:
            st = k_real[:, None]
        else:
            st = k_real[:, None] & d_ok[None, :]
        dst = dqkv_ptr + k_rows[:, None] + ch[None, :]
        tl.store(dst + C, dk.to(dqkv_ptr.dtype.element_ty), mask=st)
        tl.store(dst + 2 * C, dv.to(dqkv_ptr.dtype.element_ty), mask=st)
        if PAD:
            ok = d_ok & (want_dqkv_bias != 0)
            tl.atomic_add(dqkv_bias_ptr + C + ch, tl.sum(tl.where(pad, dk, 0.0), 0), mask=ok,
                          sem="relaxed")
            tl.atomic_add(dqkv_bias_ptr + 2 * C + ch, tl.sum(tl.where(pad, dv, 0.0), 0), mask=ok,
                          sem="relaxed")


@triton.jit
def _window_attn_bwd_dbias(qkv_ptr, tile_ptr, qkv_bias_ptr, do_ptr, lse_ptr, delta_ptr, dtile_ptr,
                           H, W, n_win, n_win_w, n_win_h, shift_h, shift_w, n_mask, cls_h, cls_w,
                           scale, s_qb, s_qh, s_qw, s_ob, s_oh, s_ow,
                           C, HEADS, HD, WH, WW, n_windows, windows_per_program,
                           HDP: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr,
                           PAD: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
                           UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    # the NB * NB pieces and the heads of a run of windows are neighbours: they read its q, k, v
    # and dO from L2 after the first of them brought them in
    qb = (pid // NB) % NB
    kb = pid % NB
    h = (pid // (NB * NB)) % HEADS
    w0 = (pid // (NB * NB * HEADS)) * windows_per_program
    N = WH * WW
    d = tl.arange(0, HDP)
    d_ok = d < HD
    ch = h * HD + d
    r = tl.arange(0, BLOCK)
    piece = BLOCK * BLOCK
    local = r[:, None] * BLOCK + r[None, :]
    at = (qb * NB + kb) * piece + local
    tile_h = tile_ptr + h * (NB * NB * piece) + at
    dbias = tl.zeros((BLOCK, BLOCK), tl.float32)
    for wid in range(w0, tl.minimum(w0 + windows_per_program, n_windows)):
        b, wy0, wx0, cls = _window_of(wid, n_win, n_win_w, n_win_h, WH, WW, n_mask, cls_h, cls_w)
        real, q, do, lse, delta = _query_block(
            qkv_ptr, qkv_bias_ptr, do_ptr, lse_ptr, delta_ptr, qb * BLOCK, b, wy0, wx0, h, ch,
            d_ok, N, H, W, WW, shift_h, shift_w, scale, s_qb, s_qh, s_qw, s_ob, s_oh, s_ow,
            HEADS, BLOCK, PAD, EVEN_D, UPCAST)
        k_valid, k_real, syk, sxk = _tokens(kb * BLOCK, N, WW, wy0, wx0, H, W, shift_h, shift_w,
                                            BLOCK, PAD)
        k_rows = b * s_qb + syk * s_qh + sxk * s_qw
        k = _up(_load_rows(qkv_ptr + C, k_rows, ch, k_valid, k_real, d_ok, qkv_bias_ptr + C,
                           PAD, EVEN_D), UPCAST)
        v = _up(_load_rows(qkv_ptr + 2 * C, k_rows, ch, k_valid, k_real, d_ok,
                           qkv_bias_ptr + 2 * C, PAD, EVEN_D), UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) \
            + tl.load(tile_h + (cls * HEADS).to(tl.int64) * (NB * NB * piece))
        p = tl.where(real[:, None], tl.math.exp2(s * LOG2E - (lse * LOG2E)[:, None]), 0.0)
        dbias += p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
    tl.atomic_add(dtile_ptr + h * (NB * NB * piece) + at, dbias, sem="relaxed")
