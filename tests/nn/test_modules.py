"""dimap_fast.nn: drop-in modules and convert; the Triton path runs under the interpreter on CPU."""

import copy

import pytest
import torch
from timm.models import swin_transformer as timm_swin
from torch import nn

import dimap_fast.nn as dnn
from dimap_fast.errors import DimapError
from tolerances import assert_close, assert_rel_close, matmul_precision

# The CPU's autocast dtype is bfloat16; CUDA's default is float16.
AUTOCAST = {"cpu": torch.bfloat16, "cuda": torch.float16}

PRUNABLE = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def small_swin(img_size=32, seed=0):
    torch.manual_seed(seed)
    model = timm_swin.SwinTransformer(img_size=img_size, patch_size=2, window_size=4, embed_dim=32,
                                      depths=(2, 2), num_heads=(2, 4), num_classes=10)
    with torch.no_grad():
        for blk in model.modules():
            if isinstance(blk, timm_swin.WindowAttention):
                blk.relative_position_bias_table.normal_()
    return model.eval()


def block_prune(model, ratio=0.5, block=16):
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.endswith(PRUNABLE):
            dnn.zero_smallest_tiles_(mod.weight, ratio, block)
    return model


@pytest.fixture
def triton_backend():
    with dnn.backend("triton"):
        yield


# ---- SparseLinear ----

def test_sparse_linear_shares_parameters_and_matches_on_cpu():
    lin = nn.Linear(40, 70)
    dnn.zero_smallest_tiles_(lin.weight, 0.5, 16)
    sp = dnn.SparseLinear.from_linear(lin, block=16)
    assert sp.weight is lin.weight and sp.bias is lin.bias
    assert isinstance(sp, nn.Linear) and set(sp.state_dict()) == {"weight", "bias"}
    assert sp.tile_sparsity() == pytest.approx(0.5, abs=0.07)
    x = torch.randn(3, 5, 40)
    assert torch.equal(sp(x), lin(x))


@torch.no_grad()
def test_sparse_linear_triton_path_and_repack(triton_backend, device):
    lin = nn.Linear(40, 70, bias=False).to(device)
    dnn.zero_smallest_tiles_(lin.weight, 0.5, 16)
    sp = dnn.SparseLinear.from_linear(lin, block=16)
    x = torch.randn(9, 40, device=device)
    with matmul_precision("ieee"):
        assert_close(sp(x), lin(x))
        first = sp.packed()
        lin.weight[:16].zero_()  # an in-place update must be seen by the next forward
        assert sp.packed() is not first
        assert_close(sp(x), lin(x))


@torch.no_grad()
def test_sparse_linear_follows_autocast(triton_backend, device):
    # fp32 parameters, half-precision activations: the tiles follow the autocast dtype, as
    # F.linear does, instead of refusing the mixed dtypes.
    lin = nn.Linear(40, 70).to(device)
    dnn.zero_smallest_tiles_(lin.weight, 0.5, 16)
    sp = dnn.SparseLinear.from_linear(lin, block=16)
    x = torch.randn(9, 40, device=device)
    half = AUTOCAST[device.type]
    with torch.autocast(device.type, dtype=half):
        got, want = sp(x), lin(x)
        again = sp(x.to(half))  # activations already in the autocast dtype
    assert got.dtype == want.dtype == again.dtype == half
    assert_close(got, want.float())
    assert torch.equal(got, again)
    assert sp.weight.dtype == torch.float32 and sp.packed().tiles.dtype == torch.float32


@torch.no_grad()
def test_converted_model_under_autocast(triton_backend, device):
    model = block_prune(small_swin(img_size=16)).to(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    half = AUTOCAST[device.type]
    with dnn.backend("torch"), torch.autocast(device.type, dtype=half):
        want = model(x)
    dnn.convert(model, choose="kernel")
    with torch.autocast(device.type, dtype=half):
        got = model(x)
    assert got.dtype == want.dtype
    assert_close(got, want.float())


def test_triton_backend_refuses_autograd_through_the_sparse_linear(triton_backend, device):
    sp = dnn.SparseLinear(16, 16, block=16, device=device)
    with pytest.raises(RuntimeError, match="forward-only"):
        sp(torch.randn(2, 16, device=device))


def test_backend_names():
    assert dnn.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown backend"):
        dnn.set_backend("cuda")


# ---- WindowAttention drop-in ----

def window_attention_pair(seed=0):
    torch.manual_seed(seed)
    ref = timm_swin.WindowAttention(32, num_heads=2, window_size=4).eval()
    with torch.no_grad():
        ref.relative_position_bias_table.normal_()
    ours = dnn.WindowAttention(32, num_heads=2, window_size=4).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@torch.no_grad()
@pytest.mark.parametrize("masked", [False, True])
def test_window_attention_drop_in(masked, device):
    ref, ours = (m.to(device) for m in window_attention_pair())
    blk = timm_swin.SwinTransformerBlock(32, (8, 8), num_heads=2, window_size=4, shift_size=2)
    mask = blk.attn_mask.to(device) if masked else None  # (4, 16, 16)
    x = torch.randn(8, 16, 32, device=device)  # 2 images x 4 windows
    with matmul_precision("ieee"):
        want = ref(x, mask)
        with dnn.backend("torch"):
            assert torch.equal(ours(x, mask), want)
        with dnn.backend("triton"):
            assert_close(ours(x, mask), want)


def grads_of(module, x, *args, d_out_seed=3):
    """Output and the gradients of the input and of every parameter, after one backward."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = module(x, *args)
    g = torch.Generator().manual_seed(d_out_seed)
    out.backward(torch.randn(out.shape, generator=g).to(out.device))
    return {"output": out, "input": x.grad,
            **{n: p.grad for n, p in module.named_parameters()}}


@pytest.mark.parametrize("masked", [False, True])
def test_window_attention_trains_through_the_fused_path(masked, device, kernel_calls):
    ref, ours = (m.to(device) for m in window_attention_pair())
    ref.train(), ours.train()  # attn_drop is 0: training keeps the fused path
    blk = timm_swin.SwinTransformerBlock(32, (8, 8), num_heads=2, window_size=4, shift_size=2)
    mask = blk.attn_mask.to(device) if masked else None
    x = torch.randn(8, 16, 32, device=device)
    with matmul_precision("ieee"):
        want = grads_of(ref, x, mask)
        with dnn.backend("triton"):
            got = grads_of(ours, x, mask)
    assert kernel_calls["window_attention"] and set(got) == set(want) and len(want) == 7  # out, in, table, qkv, proj
    for name in want:
        assert_rel_close(got[name], want[name], torch.float32, name)


def test_swin_block_trains_through_the_fused_path(device, kernel_calls):
    # Shifted, on a resolution that is not a multiple of the window: padding and region mask.
    torch.manual_seed(0)
    ref = timm_swin.SwinTransformerBlock(32, (6, 10), num_heads=2, window_size=4, shift_size=2,
                                         always_partition=True).to(device).train()
    with torch.no_grad():
        ref.attn.relative_position_bias_table.normal_()
        ref.attn.qkv.bias.normal_()
    ours = copy.deepcopy(ref)
    dnn.SwinBlock.adopt(ours)
    x = torch.randn(2, 6, 10, 32, device=device)
    with matmul_precision("ieee"):
        want = grads_of(ref, x)
        with dnn.backend("triton"):
            got = grads_of(ours, x)
    assert kernel_calls["window_attention"] and set(got) == set(want)
    for name in want:
        assert_rel_close(got[name], want[name], torch.float32, name)


# ---- convert ----

@torch.no_grad()
def test_convert_small_swin_same_logits_on_cpu():
    model = block_prune(small_swin())
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    assert dnn.convert(model, choose="kernel") is model
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())  # swapped in place, no copies
    blocks = [m for m in model.modules() if isinstance(m, timm_swin.SwinTransformerBlock)]
    assert len(blocks) == 4 and all(type(b) is dnn.SwinBlock for b in blocks)
    assert all(type(b.attn) is dnn.WindowAttention for b in blocks)
    sparse = [n for n, m in model.named_modules() if isinstance(m, dnn.SparseLinear)]
    assert len(sparse) == 16 and all(m.block == 16 for m in model.modules()
                                     if isinstance(m, dnn.SparseLinear))
    assert (model(x) - want).abs().max() <= 1e-5
    assert dnn.convert(model) is model  # again: nothing left to swap, no error


def test_convert_keeps_dense_layers_and_picks_block():
    model = small_swin(img_size=16)
    lin = model.layers[1].blocks[0].mlp.fc1  # 64 -> 256
    dnn.zero_smallest_tiles_(lin.weight, 0.5, 32)
    assert dnn.choose_block(lin.weight)[0] == 32
    dnn.convert(model, choose="kernel")
    sparse = [m for m in model.modules() if isinstance(m, dnn.SparseLinear)]
    assert len(sparse) == 1 and sparse[0].block == 32 and sparse[0].weight is lin.weight
    assert type(model.layers[0].blocks[0].attn.qkv) is nn.Linear  # dense: left alone


def test_convert_refusals():
    with pytest.raises(DimapError, match="no block, window attention or prunable Linear"):
        dnn.convert(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(DimapError, match="block must be"):
        dnn.convert(small_swin(img_size=16), block=8)


@torch.no_grad()
def test_converted_model_triton_path(triton_backend, device):
    # The CUDA code path (sparse linears, fused attention on tokens, shifted and not); under the
    # interpreter without a GPU, on a model small enough for it.
    model = block_prune(small_swin(img_size=16)).to(device)
    x = torch.randn(1, 3, 16, 16, device=device)
    with matmul_precision("ieee"):
        with dnn.backend("torch"):
            want = model(x)
        dnn.convert(model, choose="kernel")
        assert any(any(b.shift_size) for b in model.modules() if isinstance(b, dnn.SwinBlock))
        assert_close(model(x), want)



# ---- the `bench` subcommand ----

def test_kernel_bench_cpu_table_and_plot(tmp_path, capsys):
    import argparse

    from dimap_fast.cli.bench import add_parser as add_bench_parser
    from dimap_fast.cli.bench_body import run_kernel_bench

    parser = argparse.ArgumentParser(prog="dimap-fast")
    add_bench_parser(parser.add_subparsers(dest="command"))
    png = tmp_path / "bench.png"
    args = parser.parse_args(["bench", "--shapes", "48x80", "--sparsities", "0,0.5", "--block",
                              "16", "--batch-tokens", "32", "--device", "cpu", "--plot", str(png)])
    assert run_kernel_bench(args) == 0
    out = capsys.readouterr().out
    assert "CPU code path" in out and out.count("48x80") == 2
    assert png.stat().st_size > 0
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--shapes", "48by80"])


# ---- shapes the fused kernel does not take ----

@torch.no_grad()
def test_unsupported_head_dim_falls_back_or_refuses(device):
    attn = dnn.WindowAttention(2 * 144, num_heads=2, window_size=4).eval().to(device)  # head dim 144
    x = torch.randn(2, 16, 288, device=device)
    with dnn.backend("torch"):
        want = attn(x)
    assert torch.equal(attn(x), want)  # "auto": timm's path, also on CUDA
    with dnn.backend("triton"), pytest.raises(DimapError, match="head dim 144 .* limit of 128"):
        attn(x)


@torch.no_grad()
def test_float64_falls_back_or_refuses(device):
    lin = nn.Linear(32, 64, dtype=torch.float64).to(device)
    dnn.zero_smallest_tiles_(lin.weight, 0.5, 16)
    sp = dnn.SparseLinear.from_linear(lin, block=16)
    attn = dnn.WindowAttention(32, num_heads=2, window_size=4).to(device, torch.float64).eval()
    x_lin = torch.randn(3, 32, device=device, dtype=torch.float64)
    x_attn = torch.randn(2, 16, 32, device=device, dtype=torch.float64)
    with dnn.backend("torch"):
        want_lin, want_attn = sp(x_lin), attn(x_attn)
    assert torch.equal(sp(x_lin), want_lin) and torch.equal(attn(x_attn), want_attn)  # auto
    with dnn.backend("triton"):
        with pytest.raises(DimapError, match="float64 inputs: the block-sparse kernel"):
            sp(x_lin)
        with pytest.raises(DimapError, match="float64 activations: the fused kernel"):
            attn(x_attn)
