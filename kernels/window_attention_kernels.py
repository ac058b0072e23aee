"""The Triton kernels of the fused Swin window attention: forward, and the two backward passes.

All three read q, k and v straight from the qkv projection of the un-partitioned token map
(B, H, W, 3*C), channels laid out as timm's (3, heads, head_dim), and address window tokens by
index arithmetic (see window_attention.py). A program owns one (image and window, group of heads,
block of BLOCK tokens) and visits the other side's tokens BLOCK at a time, for each of a group of heads in turn:

- forward: a query block, keys visited with an online softmax (running maximum and sum in
  float32); it also stores each query's log-sum-exp when a backward will follow;
- ``_window_attn_bwd_dkdv``: a key block, queries visited: dV = P^T dO, dK = dS^T (q * scale),
  with P recomputed from the stored log-sum-exp and dS = P * (dO V^T - delta), delta = rowsum(dO*O)
  (FlashAttention-2's backward, without a causal mask and with Swin's bias and regions added);
- ``_window_attn_bwd_dq``: a query block, keys visited: dQ = scale * dS K, and dS summed over
  windows into the gradient of the dense (heads, N, N) bias (atomic adds), from which autograd
  reaches the bias table.

Padding tokens (resolution not a multiple of the window) read the qkv bias; their dK and dV are
summed into the qkv bias's gradient. Padding queries have no output, hence no gradient.
"""

from __future__ import annotations

from ._common import tl, triton


@triton.jit
def _window_tokens(t0, N, WW, wy0, wx0, H, W, shift_h, shift_w, BLOCK: tl.constexpr):
    """BLOCK window tokens from t0: index, in the window, grid row and column, inside the image,
    and the row and column of the (cyclically shifted) token they read."""
    t = t0 + tl.arange(0, BLOCK)
    valid = t < N
    y = wy0 + t // WW
    x = wx0 + t % WW
    real = valid & (y < H) & (x < W)
    return t, valid, y, x, real, ((y + shift_h) % H).to(tl.int64), ((x + shift_w) % W).to(tl.int64)


@triton.jit
def _load_qkv_tile(src_ptr, bias_ptr, tok_valid, tok_real, ch, d_ok, has_bias):
    """A (tokens, HDP) tile of q, k or v; padding tokens read the qkv bias (timm's zero pad)."""
    x = tl.load(src_ptr[:, None] + ch[None, :], mask=tok_real[:, None] & d_ok[None, :], other=0.0)
    pad = (tok_valid & ~tok_real & (has_bias != 0))[:, None] & d_ok[None, :]
    return tl.where(pad, tl.load(bias_ptr + ch[None, :], mask=pad, other=0.0), x)


@triton.jit
def _q_tile(src_ptr, bias_ptr, valid, real, ch, d_ok, has_bias, scale, UPCAST: tl.constexpr):
    """The scaled q of a token tile (timm scales q in its own dtype before the product)."""
    q = _load_qkv_tile(src_ptr, bias_ptr, valid, real, ch, d_ok, has_bias)
    q = (q.to(tl.float32) * scale).to(q.dtype)
    if UPCAST:
        q = q.to(tl.float32)
    return q


@triton.jit
def _kv_tile(src_ptr, bias_ptr, valid, real, ch, d_ok, C, has_bias, UPCAST: tl.constexpr):
    """The k and v of a token tile."""
    k = _load_qkv_tile(src_ptr + C, bias_ptr + C, valid, real, ch, d_ok, has_bias)
    v = _load_qkv_tile(src_ptr + 2 * C, bias_ptr + 2 * C, valid, real, ch, d_ok, has_bias)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _region(y, x, Hp, Wp, WH, WW, shift_h, shift_w):
    """timm's shifted-window region of grid positions: rows [0, Hp-WH), [Hp-WH, Hp-shift),
    [Hp-shift, Hp) (likewise columns); one region along an axis that is not shifted."""
    rh = tl.where(y < Hp - WH, 0, tl.where(y < Hp - shift_h, 1, 2))
    rw = tl.where(x < Wp - WW, 0, tl.where(x < Wp - shift_w, 1, 2))
    return tl.where(shift_h > 0, rh, 0) * 3 + tl.where(shift_w > 0, rw, 0)


@triton.jit
def _scores(q, k, bias_rows, tk, q_valid, k_valid, rq, rk, regions, PREC: tl.constexpr):
    """(q * scale) k^T + the dense bias (+ the explicit mask folded in) + the region mask, in
    float32; keys outside the window at -inf."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    s += tl.load(bias_rows[:, None] + tk[None, :], mask=q_valid[:, None] & k_valid[None, :],
                 other=0.0)
    s += tl.where((regions != 0) & (rq[:, None] != rk[None, :]), -100.0, 0.0)
    return tl.where(k_valid[None, :], s, float("-inf"))


@triton.jit
def _query_block(pid, qkv_ptr, H, W, n_win, n_win_w, shift_h, shift_w, Hp, Wp, s_qb, s_qh, s_qw,
                 WH, WW, BLOCK: tl.constexpr):
    """What the forward and dQ programs share about their query tile (program axis 2) of window
    ``pid`` (image * n_win + window): image, window size and corner, the tokens, where they read
    from, and their shifted-window region. Regions are a runtime flag rather than a constexpr, so one
    compiled kernel serves shifted and unshifted blocks."""
    b = (pid // n_win).to(tl.int64)
    win = pid % n_win
    N = WH * WW
    wy0 = (win // n_win_w) * WH  # the window's corner in the shifted, padded grid
    wx0 = (win % n_win_w) * WW
    tq, q_valid, yq, xq, q_real, syq, sxq = _window_tokens(tl.program_id(2) * BLOCK, N, WW, wy0,
                                                           wx0, H, W, shift_h, shift_w, BLOCK)
    q_src = qkv_ptr + b * s_qb + syq * s_qh + sxq * s_qw
    rq = _region(yq, xq, Hp, Wp, WH, WW, shift_h, shift_w)
    return b, N, wy0, wx0, tq, q_valid, q_real, syq, sxq, q_src, rq


@triton.jit
def _window_attn_fwd(qkv_ptr, bias_ptr, qkv_bias_ptr, out_ptr, lse_ptr,
                     H, W, n_win, n_win_w, shift_h, shift_w, Hp, Wp, n_bias, scale,
                     s_qb, s_qh, s_qw, s_ob, s_oh, s_ow,
                     C, HEADS, HD, WH, WW, regions, has_bias, heads_per_program, store_lse,
                     HDP: tl.constexpr, BLOCK: tl.constexpr,
                     PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)  # image * n_win + window
    b, N, wy0, wx0, tq, q_valid, q_real, syq, sxq, q_src, rq = _query_block(
        pid, qkv_ptr, H, W, n_win, n_win_w, shift_h, shift_w, Hp, Wp, s_qb, s_qh, s_qw, WH, WW, BLOCK)
    d = tl.arange(0, HDP)
    d_ok = d < HD
    h0 = tl.program_id(1) * heads_per_program
    # Several heads per program: the token arithmetic above is done once, and the heads of a
    # token sit side by side in memory, so a program reads whole cache lines of its tokens.
    for h in range(h0, tl.minimum(h0 + heads_per_program, HEADS)):
        ch = h * HD + d
        q = _q_tile(q_src, qkv_bias_ptr, q_valid, q_real, ch, d_ok, has_bias, scale, UPCAST)
        bias_rows = bias_ptr + ((pid % n_bias) * HEADS + h).to(tl.int64) * N * N + tq * N
        m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK,), tl.float32)
        acc = tl.zeros((BLOCK, HDP), tl.float32)
        for k0 in range(0, N, BLOCK):
            tk, k_valid, yk, xk, k_real, syk, sxk = _window_tokens(k0, N, WW, wy0, wx0, H, W,
                                                                   shift_h, shift_w, BLOCK)
            k, v = _kv_tile(qkv_ptr + b * s_qb + syk * s_qh + sxk * s_qw, qkv_bias_ptr, k_valid,
                            k_real, ch, d_ok, C, has_bias, UPCAST)
            rk = _region(yk, xk, Hp, Wp, WH, WW, shift_h, shift_w)
            s = _scores(q, k, bias_rows, tk, q_valid, k_valid, rq, rk, regions, PREC)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        o = acc / l_i[:, None]
        tl.store(out_ptr + b * s_ob + syq[:, None] * s_oh + sxq[:, None] * s_ow + ch[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=q_real[:, None] & d_ok[None, :])
        tok = ((b * H + syq) * W + sxq) * HEADS + h
        tl.store(lse_ptr + tok, m_i + tl.log(l_i), mask=q_real & (store_lse != 0))


@triton.jit
def _window_attn_bwd_dkdv(qkv_ptr, bias_ptr, qkv_bias_ptr, do_ptr, lse_ptr, delta_ptr,
                          dqkv_ptr, dqkv_bias_ptr,
                          H, W, n_win, n_win_w, shift_h, shift_w, Hp, Wp, n_bias, scale,
                          s_qb, s_qh, s_qw, s_ob, s_oh, s_ow,
                          C, HEADS, HD, WH, WW, regions, has_bias, heads_per_program,
                          want_dqkv_bias,
                          HDP: tl.constexpr, BLOCK: tl.constexpr,
                          PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_win).to(tl.int64)
    win = pid % n_win
    N = WH * WW
    wy0 = (win // n_win_w) * WH
    wx0 = (win % n_win_w) * WW
    d = tl.arange(0, HDP)
    d_ok = d < HD
    tk, k_valid, yk, xk, k_real, syk, sxk = _window_tokens(tl.program_id(2) * BLOCK, N, WW, wy0,
                                                           wx0, H, W, shift_h, shift_w, BLOCK)
    k_src = qkv_ptr + b * s_qb + syk * s_qh + sxk * s_qw
    rk = _region(yk, xk, Hp, Wp, WH, WW, shift_h, shift_w)
    pad = (k_valid & ~k_real)[:, None]
    any_pad = (tl.sum(pad.to(tl.int32), 0) > 0) & (want_dqkv_bias != 0)
    h0 = tl.program_id(1) * heads_per_program
    for h in range(h0, tl.minimum(h0 + heads_per_program, HEADS)):
        ch = h * HD + d
        k, v = _kv_tile(k_src, qkv_bias_ptr, k_valid, k_real, ch, d_ok, C, has_bias, UPCAST)
        bias_base = bias_ptr + ((pid % n_bias) * HEADS + h).to(tl.int64) * N * N
        dk = tl.zeros((BLOCK, HDP), tl.float32)
        dv = tl.zeros((BLOCK, HDP), tl.float32)
        for q0 in range(0, N, BLOCK):
            tq, q_valid, yq, xq, q_real, syq, sxq = _window_tokens(q0, N, WW, wy0, wx0, H, W,
                                                                   shift_h, shift_w, BLOCK)
            q = _q_tile(qkv_ptr + b * s_qb + syq * s_qh + sxq * s_qw, qkv_bias_ptr, q_valid,
                        q_real, ch, d_ok, has_bias, scale, UPCAST)
            do = tl.load(do_ptr + b * s_ob + syq[:, None] * s_oh + sxq[:, None] * s_ow
                         + ch[None, :], mask=q_real[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                do = do.to(tl.float32)
            tok = ((b * H + syq) * W + sxq) * HEADS + h
            lse = tl.load(lse_ptr + tok, mask=q_real, other=0.0)
            delta = tl.load(delta_ptr + tok, mask=q_real, other=0.0)
            rq = _region(yq, xq, Hp, Wp, WH, WW, shift_h, shift_w)
            s = _scores(q, k, bias_base + tq * N, tk, q_valid, k_valid, rq, rk, regions, PREC)
            p = tl.where(q_real[:, None], tl.exp(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)

        dst = dqkv_ptr + b * s_qb + syk[:, None] * s_qh + sxk[:, None] * s_qw + ch[None, :]
        st = k_real[:, None] & d_ok[None, :]
        tl.store(dst + C, dk.to(dqkv_ptr.dtype.element_ty), mask=st)
        tl.store(dst + 2 * C, dv.to(dqkv_ptr.dtype.element_ty), mask=st)
        # Padding keys are the qkv bias: their gradient is the bias's, summed over this block.
        tl.atomic_add(dqkv_bias_ptr + C + ch, tl.sum(tl.where(pad, dk, 0.0), 0),
                      mask=d_ok & any_pad)
        tl.atomic_add(dqkv_bias_ptr + 2 * C + ch, tl.sum(tl.where(pad, dv, 0.0), 0),
                      mask=d_ok & any_pad)


@triton.jit
def _window_attn_bwd_dq(qkv_ptr, bias_ptr, qkv_bias_ptr, do_ptr, lse_ptr, delta_ptr,
                        dqkv_ptr, dbias_ptr,
                        H, W, n_win, n_win_w, shift_h, shift_w, Hp, Wp, n_bias, scale,
                        s_qb, s_qh, s_qw, s_ob, s_oh, s_ow,
                        C, HEADS, HD, WH, WW, regions, has_bias, heads_per_program, want_dbias,
                        HDP: tl.constexpr, BLOCK: tl.constexpr,
                        PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    b, N, wy0, wx0, tq, q_valid, q_real, syq, sxq, q_src, rq = _query_block(
        pid, qkv_ptr, H, W, n_win, n_win_w, shift_h, shift_w, Hp, Wp, s_qb, s_qh, s_qw, WH, WW, BLOCK)
    d = tl.arange(0, HDP)
    d_ok = d < HD
    h0 = tl.program_id(1) * heads_per_program
    for h in range(h0, tl.minimum(h0 + heads_per_program, HEADS)):
        ch = h * HD + d
        q = _q_tile(q_src, qkv_bias_ptr, q_valid, q_real, ch, d_ok, has_bias, scale, UPCAST)
        do = tl.load(do_ptr + b * s_ob + syq[:, None] * s_oh + sxq[:, None] * s_ow + ch[None, :],
                     mask=q_real[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            do = do.to(tl.float32)
        tok = ((b * H + syq) * W + sxq) * HEADS + h
        lse = tl.load(lse_ptr + tok, mask=q_real, other=0.0)
        delta = tl.load(delta_ptr + tok, mask=q_real, other=0.0)
        bias_off = ((pid % n_bias) * HEADS + h).to(tl.int64) * N * N + tq * N
        dq = tl.zeros((BLOCK, HDP), tl.float32)
        for k0 in range(0, N, BLOCK):
            tk, k_valid, yk, xk, k_real, syk, sxk = _window_tokens(k0, N, WW, wy0, wx0, H, W,
                                                                   shift_h, shift_w, BLOCK)
            k, v = _kv_tile(qkv_ptr + b * s_qb + syk * s_qh + sxk * s_qw, qkv_bias_ptr, k_valid,
                            k_real, ch, d_ok, C, has_bias, UPCAST)
            rk = _region(yk, xk, Hp, Wp, WH, WW, shift_h, shift_w)
            s = _scores(q, k, bias_ptr + bias_off, tk, q_valid, k_valid, rq, rk, regions, PREC)
            p = tl.where(q_real[:, None], tl.exp(s - lse[:, None]), 0.0)
            ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
            # The bias is shared by every window (and image): its gradient sums dS over them.
            tl.atomic_add(dbias_ptr + bias_off[:, None] + tk[None, :], ds,
                          mask=q_valid[:, None] & k_valid[None, :] & (want_dbias != 0))
        tl.store(dqkv_ptr + b * s_qb + syq[:, None] * s_qh + sxq[:, None] * s_qw + ch[None, :],
                 (dq * scale).to(dqkv_ptr.dtype.element_ty), mask=q_real[:, None] & d_ok[None, :])
