"""Gradients of the fused window attention against autograd through the plain-torch reference."""

import pytest
import torch
from tolerances import DTYPE_CASES, DTYPE_IDS, assert_rel_close, matmul_precision

from dimap_fast.kernels.window_attention import (
    shifted_window_mask,
    window_attention,
    window_attention_reference,
)
from dimap_fast.kernels.window_attention_settings import bias_grad

# (resolution, window, shift, heads, head_dim, batch, explicit mask)
CASES = [
    pytest.param((8, 8), 4, 2, 2, 16, 2, False, id="w4-shift"),
    pytest.param((6, 10), 4, 2, 1, 16, 1, False, id="w4-shift-pad"),
    pytest.param((9, 9), 7, 3, 2, 16, 1, False, id="w7-shift-pad"),
    pytest.param((7, 7), 7, 0, 1, 32, 2, False, id="w7-plain"),
    pytest.param((6, 6), 4, 2, 6, 16, 1, False, id="w4-shift-pad-6heads"),  # groups of 4 and 2
    pytest.param((8, 8), 8, 0, 1, 48, 1, False, id="w8-hd48"),
    pytest.param((15, 15), 12, 6, 1, 16, 1, False, id="w12-shift-pad"),
    pytest.param((16, 16), 16, 0, 1, 16, 1, False, id="w16-plain"),
    # several key blocks, two heads, three windows: bias-gradient runs of 2 and 1 windows
    pytest.param((12, 36), 12, 6, 2, 16, 1, False, id="w12-shift-2heads-3windows"),
    pytest.param((8, 8), 4, 0, 2, 16, 2, True, id="w4-explicit-mask"),
    pytest.param((8, 8), 4, 2, 2, 16, 2, True, id="w4-explicit-mask-and-shift"),
    pytest.param((12, 12), 4, 2, 1, 16, 1, False, id="w4-shift-9windows"),  # a partial last run
]


def inputs(res, window, heads, head_dim, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = heads * head_dim
    qkv = torch.randn(batch, *res, 3 * c, generator=g)
    table = torch.randn((2 * window - 1) ** 2, heads, generator=g)
    qkv_bias = torch.randn(3 * c, generator=g)
    d_out = torch.randn(batch, *res, c, generator=g)
    return [t.to(device) for t in (qkv, table, qkv_bias, d_out)]


def grads(fn, qkv, table, qkv_bias, d_out, heads, window, shift, mask, dtype):
    """(output, d qkv, d table, d qkv_bias) of ``fn`` with ``dtype`` activations."""
    leaves = [t.detach().to(dt).clone().requires_grad_()
              for t, dt in ((qkv, dtype), (table, torch.float32), (qkv_bias, dtype))]
    out = fn(leaves[0], leaves[1], heads, window, shift, qkv_bias=leaves[2], mask=mask)
    out.backward(d_out.to(out.dtype))
    return [out] + [t.grad for t in leaves]


@pytest.mark.parametrize("res,window,shift,heads,head_dim,batch,explicit", CASES)
def test_gradients_match_reference(res, window, shift, heads, head_dim, batch, explicit, device):
    check_gradients(res, window, shift, heads, head_dim, batch, explicit, device)


# windows over several tiles, where the bias gradient has two ways (window_attention_settings)
BLOCKED = [c for c in CASES if c.id.startswith(("w12", "w16"))]


@pytest.mark.parametrize("res,window,shift,heads,head_dim,batch,explicit", BLOCKED)
def test_bias_gradient_summed_by_its_own_kernel(res, window, shift, heads, head_dim, batch,
                                                explicit, device):
    with bias_grad("sum"):
        check_gradients(res, window, shift, heads, head_dim, batch, explicit, device)


def check_gradients(res, window, shift, heads, head_dim, batch, explicit, device):
    qkv, table, qkv_bias, d_out = inputs(res, window, heads, head_dim, batch, device)
    mask = shifted_window_mask(*res, window, window // 2, device=device) if explicit else None
    with matmul_precision("ieee"):
        got = grads(window_attention, qkv, table, qkv_bias, d_out, heads, window, shift, mask,
                    torch.float32)
        want = grads(window_attention_reference, qkv, table, qkv_bias, d_out, heads, window,
                     shift, mask, torch.float32)
    padded = res[0] % window or res[1] % window
    for name, a, b in zip(("output", "d qkv", "d table", "d qkv_bias"), got, want):
        if name == "d qkv_bias" and not padded:
            # the reference reads the qkv bias only for padding; ours reports zeros
            assert b is None and not a.any()
            continue
        assert_rel_close(a, b, torch.float32, name)


@pytest.mark.parametrize("dtype,precision", DTYPE_CASES, ids=DTYPE_IDS)
def test_gradients_per_dtype(dtype, precision, device):
    res, window, shift, heads, head_dim = (9, 9), 7, 3, 2, 16
    qkv, table, qkv_bias, d_out = inputs(res, window, heads, head_dim, 1, device, seed=1)
    with matmul_precision(precision):
        got = grads(window_attention, qkv, table, qkv_bias, d_out, heads, window, shift, None,
                    dtype)
    with matmul_precision("ieee"):  # the reference: float32 from the same (rounded) inputs
        want = grads(window_attention_reference, qkv.to(dtype).float(), table,
                     qkv_bias.to(dtype).float(), d_out.to(dtype).float(), heads, window, shift,
                     None, torch.float32)
    assert got[1].dtype == dtype and got[2].dtype == torch.float32 and got[3].dtype == dtype
    for name, a, b in zip(("output", "d qkv", "d table", "d qkv_bias"), got, want):
        assert_rel_close(a, b, dtype, name)


def test_no_gradient_asked_stores_nothing_extra(device):
    qkv, table, qkv_bias, _ = inputs((8, 8), 4, 2, 16, 1, device)
    with torch.no_grad():
        a = window_attention(qkv, table, 2, 4, 2, qkv_bias=qkv_bias)
    b = window_attention(qkv.clone().requires_grad_(), table, 2, 4, 2, qkv_bias=qkv_bias)
    assert a.grad_fn is None and b.grad_fn is not None
    assert torch.equal(a, b.detach())  # the same kernel, with or without the log-sum-exp stored
