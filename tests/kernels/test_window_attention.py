import gc

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock
from tolerances import DTYPE_CASES, DTYPE_IDS, assert_close, matmul_precision

from dimap_fast.kernels.window_attention import (
    MAX_HEAD_DIM,
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
    pytest.param((8, 8), 4, True, 6, 16, 1, id="w4-shift-6heads"),  # head groups of 4 and 2
    # Several query and key tiles per window: the online softmax across key tiles.
    pytest.param((12, 12), 12, False, 1, 32, 1, id="w12-plain"),
    pytest.param((24, 12), 12, True, 1, 16, 1, id="w12-shift"),
    pytest.param((15, 15), 12, True, 1, 16, 1, id="w12-shift-pad"),
    pytest.param((16, 16), 16, False, 1, 16, 1, id="w16-plain"),
    # 81 tokens: a full key tile, then a 32-key tail whose last 15 columns are padding
    pytest.param((18, 18), 9, True, 1, 16, 1, id="w9-shift-tail"),
]


def timm_block(res, window, shifted, heads, head_dim, seed=0, device="cpu"):
    torch.manual_seed(seed)
    blk = SwinTransformerBlock(dim=heads * head_dim, input_resolution=res, num_heads=heads,
                               window_size=window, shift_size=window // 2 if shifted else 0)
    with torch.no_grad():  # make the bias table and qkv bias matter
        blk.attn.relative_position_bias_table.normal_()
        blk.attn.qkv.bias.normal_()
    return blk.eval().to(device)


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


def exact_reference(qkv, **args):
    """The reference in ieee float32 from float32 inputs, whatever the kernel ran in."""
    with matmul_precision("ieee"):
        return window_attention_reference(
            qkv.float(), **{k: v.float() if torch.is_tensor(v) else v for k, v in args.items()})


@torch.no_grad()
@pytest.mark.parametrize("res,window,shifted,heads,head_dim,batch", CASES)
def test_kernel_matches_timm(res, window, shifted, heads, head_dim, batch, device):
    blk = timm_block(res, window, shifted, heads, head_dim, device=device)
    x = torch.randn(batch, *res, heads * head_dim, device=device)
    with matmul_precision("ieee"):
        qkv = blk.attn.qkv(x)
        got = window_attention(qkv, **attn_args(blk))
        want = blk._attn(x)
    assert got.shape == (batch, *res, heads * head_dim) and got.device == x.device
    assert_close(got, exact_reference(qkv, **attn_args(blk)))
    with matmul_precision("ieee"):
        assert_close(blk.attn.proj(got), want)


@torch.no_grad()
@pytest.mark.parametrize("dtype,precision", DTYPE_CASES, ids=DTYPE_IDS)
@pytest.mark.parametrize("res,window", [((8, 8), 4), ((14, 14), 12)], ids=["w4", "w12"])
def test_dtypes_and_precisions(dtype, precision, res, window, device):
    blk = timm_block(res, window, True, 2, 16, device=device)
    qkv = blk.attn.qkv(torch.randn(1, *res, 32, device=device)).to(dtype)
    args = attn_args(blk)
    with matmul_precision(precision):
        got = window_attention(qkv, **{**args, "qkv_bias": args["qkv_bias"].to(dtype)})
    assert got.dtype == dtype
    assert_close(got, exact_reference(qkv, **args))


MULTI_TILE = [c for c in CASES if c.id.startswith(("w12", "w16", "w9"))]


@torch.no_grad()
@pytest.mark.parametrize("res,window,shifted,heads,head_dim,batch", MULTI_TILE)
def test_key_blocks_in_flight_give_the_same_attention(res, window, shifted, heads, head_dim, batch,
                                                      device):
    from dimap_fast.kernels.window_attention_settings import kv_prefetch

    blk = timm_block(res, window, shifted, heads, head_dim, device=device)
    x = torch.randn(batch, *res, heads * head_dim, device=device)
    with matmul_precision("ieee"):
        qkv = blk.attn.qkv(x)
        with kv_prefetch("on"):
            got = window_attention(qkv, **attn_args(blk))
    assert_close(got, exact_reference(qkv, **attn_args(blk)))


@torch.no_grad()
@pytest.mark.parametrize("dtype,precision", DTYPE_CASES, ids=DTYPE_IDS)
def test_key_blocks_in_flight_in_every_dtype(dtype, precision, device):
    from dimap_fast.kernels.window_attention_settings import kv_prefetch

    blk = timm_block((14, 14), 12, True, 2, 16, device=device)
    qkv = blk.attn.qkv(torch.randn(1, 14, 14, 32, device=device)).to(dtype)
    args = attn_args(blk)
    with matmul_precision(precision), kv_prefetch("on"):
        got = window_attention(qkv, **{**args, "qkv_bias": args["qkv_bias"].to(dtype)})
    assert got.dtype == dtype
    assert_close(got, exact_reference(qkv, **args))


@pytest.mark.parametrize("setting, bad, message", [
    ("bias_grad", "atomics", "way 'atomics': choose one of flush, sum"),
    ("kv_prefetch", "always", "way 'always': choose one of off, on")])
def test_an_unknown_way_is_refused_and_nothing_changes(setting, bad, message):
    from dimap_fast.kernels import window_attention_settings as settings

    before = getattr(settings, f"get_{setting}")()
    with pytest.raises(ValueError, match=message):
        getattr(settings, f"set_{setting}")(bad)
    assert getattr(settings, f"get_{setting}")() == before
    with pytest.raises(ValueError), getattr(settings, setting)(bad):
        pass
    assert getattr(settings, f"get_{setting}")() == before


@torch.no_grad()
@pytest.mark.parametrize("window", [4, 12])
def test_explicit_mask_on_windows(window, device):
    # timm's own layout: windows (num_windows*B, N, 3C) seen as one-window token maps.
    res = 2 * window
    blk = timm_block((res, res), window, True, 2, 16, device=device)
    mask = shifted_window_mask(res, res, window, window // 2, device=device)  # (4, N, N)
    windows = torch.randn(8, window, window, 96, device=device)
    args = {**attn_args(blk), "shift_size": 0, "qkv_bias": None}
    got = window_attention(windows, mask=mask, **args)
    assert_close(got, exact_reference(windows, mask=mask, **args))
    assert torch.equal(mask, blk.attn_mask)


@torch.no_grad()
def test_strided_token_map_and_scale(device):
    blk = timm_block((8, 8), 4, True, 1, 16, device=device)
    qkv = torch.randn(1, 8, 16, 48, device=device)[:, :, ::2]  # non-contiguous H/W strides
    args = attn_args(blk)
    got = window_attention(qkv, scale=0.3, **args)
    assert_close(got, exact_reference(qkv, scale=0.3, **args))


def test_refusals(device):
    table = torch.zeros(169, 2, device=device)
    qkv = torch.zeros(1, 7, 7, 96, device=device)
    with pytest.raises(ValueError, match=f"limit of {MAX_HEAD_DIM}"):
        window_attention(torch.zeros(1, 7, 7, 3 * 2 * 144, device=device), table, 2, 7)
    with pytest.raises(ValueError, match="rel_pos_table"):
        window_attention(qkv, torch.zeros(48, 2, device=device), 2, 7)
    with pytest.raises(ValueError, match="3 \\* num_heads"):
        window_attention(torch.zeros(1, 7, 7, 95, device=device), table, 2, 7)
    with pytest.raises(ValueError, match="shift"):
        window_attention(qkv, table, 2, 7, 7)
    with pytest.raises(ValueError, match="divide"):
        window_attention(torch.zeros(3, 7, 7, 96, device=device), table, 2, 7,
                         mask=torch.zeros(2, 49, 49, device=device))


@torch.no_grad()
def test_a_changed_table_is_folded_again_from_the_table_alone(device):
    import importlib

    from torch.utils._python_dispatch import TorchDispatchMode

    from dimap_fast.kernels.window_attention import (dense_position_bias, folded_bias_tile,
                                                     region_class_masks)

    class Ops(TorchDispatchMode):
        names: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    wa = importlib.import_module("dimap_fast.kernels.window_attention_tiles")
    table = torch.randn(49, 2, device=device)
    wa.bias_tile(table, None, (4, 4), (2, 2), 16)
    table.mul_(-2.0)  # an optimizer step
    with Ops() as ops:
        tile = wa.bias_tile(table, None, (4, 4), (2, 2), 16)
    expected = folded_bias_tile(dense_position_bias(table, (4, 4)),
                                region_class_masks((4, 4), (2, 2), device=device), 16)
    assert torch.equal(tile, expected)
    # the table index and the region masks are the geometry's: not rebuilt (some 60 more ops,
    # each a kernel launch on a GPU)
    assert len(ops.names) <= 8, ops.names


@torch.no_grad()
def test_bias_tile_is_cached_until_the_table_changes(device):
    import importlib

    wa = importlib.import_module("dimap_fast.kernels.window_attention_tiles")
    blk = timm_block((8, 8), 4, True, 2, 16, device=device)
    args = attn_args(blk)
    qkv = torch.randn(1, 8, 8, 96, device=device)
    first = window_attention(qkv, **args)
    tile = wa.bias_tile(args["rel_pos_table"], None, (4, 4), (2, 2), 16)
    assert wa.bias_tile(args["rel_pos_table"], None, (4, 4), (2, 2), 16) is tile
    args["rel_pos_table"].mul_(-2.0)  # an optimizer step: same tensor, new version
    assert wa.bias_tile(args["rel_pos_table"], None, (4, 4), (2, 2), 16) is not tile
    second = window_attention(qkv, **args)
    assert_close(second, exact_reference(qkv, **args))
    assert not torch.equal(first, second)
    fresh = torch.randn(49, 2, device=device)  # a fresh tensor (version 0) is cached too ...
    wa.bias_tile(fresh, None, (4, 4), (2, 2), 16)
    held = len(wa.TILES)
    del fresh  # ... and its tile leaves with it
    gc.collect()
    assert len(wa.TILES) == held - 1


@pytest.mark.parametrize("setting,way", [("bias_grad", "flush"), ("bias_grad", "sum"),
                                         ("kv_prefetch", "on")])
def test_launch_plan_names_every_argument(setting, way):
    import importlib
    import inspect

    from dimap_fast.kernels import window_attention_settings as settings

    wa = importlib.import_module("dimap_fast.kernels.window_attention")
    twelve = 3 if way == "sum" else 2  # "sum": the bias gradient's own kernel
    for backward, window, nb_kernels in ((False, 7, 1), (True, 7, 1), (False, 12, 1),
                                         (True, 12, twelve)):
        with getattr(settings, setting)(way):
            plan = wa.launch_plan(2, 4 * window, 4 * window, 64, 2, window, window // 2,
                                  backward=backward)
        assert len(plan) == nb_kernels
        if not backward:  # the key-block loop's stages: three only where windows span tiles
            assert plan[0].config.constexprs["KV_STAGES"] == (3 if way == "on" and window == 12 else 1)
        for launch in plan:
            params = inspect.signature(launch.config.kernel.fn).parameters
            given = set(launch.args) | set(launch.config.constexprs)
            assert given == set(params), launch.config.name
            assert launch.grid[0] >= 2 * 16  # at least a program per window, or per head and run
