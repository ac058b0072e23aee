import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock

from dimap_fast.kernels.window_attention import (
    shifted_window_mask,
    window_attention,
    window_attention_reference,
)

# (resolution, window, shifted, heads, head_dim, batch): timm shrinks the window to the
# resolution and drops the shift when the resolution fits in one window.
CASES = [
    pytest.param((8, 8), 4, False, 2, 16, 2, id="w4-plain"),
    pytest.param((8, 8), 4, True, 1, 32, 1, id="w4-shift"),
    pytest.param((6, 6), 4, True, 2, 16, 2, id="w4-shift-pad"),
    pytest.param((6, 10), 4, False, 1, 16, 1, id="w4-pad"),
    pytest.param((8, 4), 4, True, 2, 16, 1, id="w4-shift-h-only"),
    pytest.param((14, 14), 7, True, 1, 32, 1, id="w7-shift"),
    pytest.param((9, 9), 7, True, 2, 16, 1, id="w7-shift-pad"),
    pytest.param((7, 7), 7, False, 2, 32, 2, id="w7-plain"),
    pytest.param((8, 8), 8, False, 1, 48, 1, id="w8-hd48"),
]


def timm_block(res, window, shifted, heads, head_dim, seed=0):
    torch.manual_seed(seed)
    blk = SwinTransformerBlock(dim=heads * head_dim, input_resolution=res, num_heads=heads,
                               window_size=window, shift_size=window // 2 if shifted else 0)
    with torch.no_grad():  # make the bias table and qkv bias matter
        blk.attn.relative_position_bias_table.normal_()
        blk.attn.qkv.bias.normal_()
    return blk.eval()


def attn_args(blk):
    a = blk.attn
    return dict(rel_pos_table=a.relative_position_bias_table, num_heads=a.num_heads,
                window_size=blk.window_size, shift_size=blk.shift_size, qkv_bias=a.qkv.bias)


@torch.no_grad()
@pytest.mark.parametrize("res,window,shifted,heads,head_dim,batch", CASES)
def test_reference_is_timm(res, window, shifted, heads, head_dim, batch):
    blk = timm_block(res, window, shifted, heads, head_dim)
    x = torch.randn(batch, *res, heads * head_dim)
    out = blk.attn.proj(window_attention_reference(blk.attn.qkv(x), **attn_args(blk)))
    torch.testing.assert_close(out, blk._attn(x), atol=1e-6, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("res,window,shifted,heads,head_dim,batch", CASES)
def test_kernel_matches_timm(res, window, shifted, heads, head_dim, batch):
    blk = timm_block(res, window, shifted, heads, head_dim)
    x = torch.randn(batch, *res, heads * head_dim)
    qkv = blk.attn.qkv(x)
    got = window_attention(qkv, **attn_args(blk))
    ref = window_attention_reference(qkv, **attn_args(blk))
    assert got.shape == (batch, *res, heads * head_dim)
    assert (got - ref).abs().max() <= 1e-4
    assert (blk.attn.proj(got) - blk._attn(x)).abs().max() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    blk = timm_block((8, 8), 4, True, 2, 16)
    qkv = blk.attn.qkv(torch.randn(1, 8, 8, 32))
    args = attn_args(blk)
    ref = window_attention_reference(qkv, **args)
    got = window_attention(qkv.to(dtype), **{**args, "qkv_bias": args["qkv_bias"].to(dtype)})
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, atol=3e-2, rtol=3e-2)


@torch.no_grad()
def test_explicit_mask_on_windows():
    # timm's own layout: windows (num_windows*B, N, 3C) seen as one-window token maps.
    blk = timm_block((8, 8), 4, True, 2, 16)
    mask = shifted_window_mask(8, 8, 4, 2)  # (4, 16, 16)
    windows = torch.randn(8, 4, 4, 96)
    args = {**attn_args(blk), "shift_size": 0, "qkv_bias": None}
    got = window_attention(windows, mask=mask, **args)
    ref = window_attention_reference(windows, mask=mask, **args)
    assert (got - ref).abs().max() <= 1e-4
    assert torch.equal(mask, blk.attn_mask)


@torch.no_grad()
def test_strided_token_map_and_scale():
    blk = timm_block((8, 8), 4, True, 1, 16)
    qkv = torch.randn(1, 8, 16, 48)[:, :, ::2]  # non-contiguous H/W strides, read in place
    args = attn_args(blk)
    got = window_attention(qkv, scale=0.3, **args)
    ref = window_attention_reference(qkv, scale=0.3, **args)
    assert (got - ref).abs().max() <= 1e-4


def test_refusals():
    table = torch.zeros(169, 2)
    qkv = torch.zeros(1, 7, 7, 96)
    with pytest.raises(ValueError, match="rel_pos_table"):
        window_attention(qkv, torch.zeros(48, 2), 2, 7)
    with pytest.raises(ValueError, match="3 \\* num_heads"):
        window_attention(torch.zeros(1, 7, 7, 95), table, 2, 7)
    with pytest.raises(ValueError, match="shift"):
        window_attention(qkv, table, 2, 7, 7)
    with pytest.raises(ValueError, match="divide"):
        window_attention(torch.zeros(3, 7, 7, 96), table, 2, 7, mask=torch.zeros(2, 49, 49))
