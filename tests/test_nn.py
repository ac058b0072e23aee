"""dimap_fast.nn: drop-in modules and convert; the Triton path runs under the interpreter on CPU."""

import pytest
import torch
from timm.models import swin_transformer as timm_swin
from torch import nn

import dimap_fast.nn as dnn
from dimap_fast.errors import DimapError

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
def test_sparse_linear_triton_path_and_repack(triton_backend):
    lin = nn.Linear(40, 70, bias=False)
    dnn.zero_smallest_tiles_(lin.weight, 0.5, 16)
    sp = dnn.SparseLinear.from_linear(lin, block=16)
    x = torch.randn(9, 40)
    assert (sp(x) - lin(x)).abs().max() <= 1e-4
    first = sp.packed()
    lin.weight[:16].zero_()  # an in-place update must be seen by the next forward
    assert sp.packed() is not first
    assert (sp(x) - lin(x)).abs().max() <= 1e-4


def test_triton_backend_refuses_autograd(triton_backend):
    sp = dnn.SparseLinear(16, 16, block=16)
    with pytest.raises(RuntimeError, match="forward-only"):
        sp(torch.randn(2, 16))


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
def test_window_attention_drop_in(masked):
    ref, ours = window_attention_pair()
    blk = timm_swin.SwinTransformerBlock(32, (8, 8), num_heads=2, window_size=4, shift_size=2)
    mask = blk.attn_mask if masked else None  # (4, 16, 16)
    x = torch.randn(8, 16, 32)  # 2 images x 4 windows
    want = ref(x, mask)
    assert torch.equal(ours(x, mask), want)
    with dnn.backend("triton"):
        assert (ours(x, mask) - want).abs().max() <= 1e-4


# ---- convert ----

@torch.no_grad()
def test_convert_small_swin_same_logits_on_cpu():
    model = block_prune(small_swin())
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    assert dnn.convert(model) is model
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
    dnn.convert(model)
    sparse = [m for m in model.modules() if isinstance(m, dnn.SparseLinear)]
    assert len(sparse) == 1 and sparse[0].block == 32 and sparse[0].weight is lin.weight
    assert type(model.layers[0].blocks[0].attn.qkv) is nn.Linear  # dense: left alone


def test_convert_refusals():
    with pytest.raises(DimapError, match="no timm Swin"):
        dnn.convert(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(DimapError, match="block must be"):
        dnn.convert(small_swin(img_size=16), block=8)


@torch.no_grad()
def test_converted_model_triton_path(triton_backend):
    # The CUDA code path (sparse linears, fused attention on tokens, shifted and not) under the
    # interpreter, on a model small enough for it.
    model = block_prune(small_swin(img_size=16))
    x = torch.randn(1, 3, 16, 16)
    with dnn.backend("torch"):
        want = model(x)
    dnn.convert(model)
    assert any(any(b.shift_size) for b in model.modules() if isinstance(b, dnn.SwinBlock))
    assert (model(x) - want).abs().max() <= 1e-4



# ---- the `bench` subcommand ----

def test_kernel_bench_cpu_table_and_plot(tmp_path, capsys):
    import argparse

    from dimap_fast.kernel_bench import add_bench_parser, run_kernel_bench

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
