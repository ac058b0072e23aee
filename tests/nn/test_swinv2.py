"""SwinV2 drop-ins: timm's cosine window attention on the fused kernel, forward and gradients."""

import copy

import pytest
import torch
from timm.models import swin_transformer_v2 as timm_v2
from tolerances import REL_TOLERANCES, assert_rel_close, matmul_precision

import dimap_fast
import dimap_fast.nn as dnn
from dimap_fast.nn.swinv2 import SwinV2Block, WindowAttentionV2


def v2_block(res=(6, 10), window=4, shift=2, heads=2, dim=32, seed=0):
    """A timm SwinV2 block whose bias MLP, logit scale and qkv biases all matter."""
    torch.manual_seed(seed)
    blk = timm_v2.SwinTransformerV2Block(dim, res, num_heads=heads, window_size=window,
                                         shift_size=shift, always_partition=True)
    with torch.no_grad():
        blk.attn.logit_scale.uniform_(0.5, 5.0)  # one head above the clamp at log(100)
        blk.attn.logit_scale[0] = 5.0
        blk.attn.q_bias.normal_()
        blk.attn.v_bias.normal_()
        for p in blk.attn.cpb_mlp.parameters():
            p.normal_(std=0.5)
    return blk


def grads_of(module, x, *args):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = module(x, *args)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device))
    return {"output": out, "input": x.grad, **{n: p.grad for n, p in module.named_parameters()}}


@pytest.mark.parametrize("masked", [False, True])
def test_window_attention_v2_forward_and_gradients(masked, device):
    blk = v2_block().to(device).train()
    ref = blk.attn
    ours = WindowAttentionV2.adopt(copy.deepcopy(ref))
    mask = blk.attn_mask if masked else None  # (6 windows of the padded 8x12 grid, 16, 16)
    x = torch.randn(12, 16, 32, device=device)  # 2 images x 6 windows
    with matmul_precision("ieee"):
        want = grads_of(ref, x, mask)
        with dnn.backend("torch"):
            assert torch.equal(ours(x, mask), ref(x, mask))  # the torch path is timm's
        with dnn.backend("triton"):
            got = grads_of(ours, x, mask)
    assert set(got) == set(want)
    assert {"logit_scale", "q_bias", "v_bias", "cpb_mlp.0.weight"} <= set(want)
    for name in want:
        assert_rel_close(got[name], want[name], torch.float32, name)


@pytest.mark.parametrize("res,window,shift", [((6, 10), 4, 2), ((8, 8), 8, 0), ((12, 12), 12, 6),
                                              ((16, 16), 16, 0)],
                         ids=["w4-shift-pad", "w8", "w12-shift", "w16"])
def test_swinv2_block_forward_and_gradients(res, window, shift, device):
    ref = v2_block(res, window, shift).to(device).train()
    ours = SwinV2Block.adopt(copy.deepcopy(ref))
    x = torch.randn(2, *res, 32, device=device)
    with matmul_precision("ieee"):
        want = grads_of(ref, x)
        with dnn.backend("triton"):
            got = grads_of(ours, x)
    assert set(got) == set(want)
    for name in want:
        assert_rel_close(got[name], want[name], torch.float32, name)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swinv2_block_half_precision(dtype, device):
    ref = v2_block().to(device).eval()
    ours = SwinV2Block.adopt(copy.deepcopy(ref))
    x = torch.randn(2, 6, 10, 32, device=device)
    with matmul_precision("ieee"):
        want = ref(x)
    with dnn.backend("triton"), torch.autocast(device.type, dtype=dtype):
        got = ours(x)
    assert_rel_close(got.float(), want, dtype, "output")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swinv2_block_gradients_half_precision(dtype, device):
    # Cosine scores times a logit scale up to 100, softmax and the bias MLP make SwinV2's half-
    # precision gradients noisy in timm's own code (bf16: the logit scale's is ~30% off float32).
    # So each gradient of ours under autocast must be about as close to float32 as timm's own
    # autocast gradient is: within 2.5x its error, or within the dtype's tolerance.
    ref = v2_block((8, 8), 4, 2).to(device).train()
    ours = SwinV2Block.adopt(copy.deepcopy(ref))
    x = torch.randn(2, 8, 8, 32, device=device)
    with matmul_precision("ieee"):
        want = grads_of(ref, x)
    with torch.autocast(device.type, dtype=dtype):
        timm_half = grads_of(ref, x)
        with dnn.backend("triton"):
            got = grads_of(ours, x)
    assert set(got) == set(want)
    bound = REL_TOLERANCES[dtype]
    for name in want:
        ours_err, timm_err = rel_err(got[name], want[name]), rel_err(timm_half[name], want[name])
        assert ours_err <= max(2.5 * timm_err, bound), f"{name}: {ours_err:.2e} vs timm {timm_err:.2e}"


def rel_err(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm())


def small_swinv2(seed=0):
    torch.manual_seed(seed)
    model = timm_v2.SwinTransformerV2(img_size=32, patch_size=2, window_size=4, embed_dim=32,
                                      depths=(2, 2), num_heads=(2, 4), num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, timm_v2.WindowAttention):
                m.q_bias.normal_()
                for p in m.cpb_mlp.parameters():
                    p.normal_(std=0.5)
    return model.eval()


@torch.no_grad()
def test_convert_swinv2_model(device):
    model = small_swinv2().to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    flops = dimap_fast.report(model)["flops"]
    with matmul_precision("ieee"):
        want = model(x)
        keys = list(model.state_dict())
        dnn.convert(model)
        blocks = [m for m in model.modules() if isinstance(m, timm_v2.SwinTransformerV2Block)]
        assert len(blocks) == 4 and all(type(b) is SwinV2Block for b in blocks)
        assert all(type(b.attn) is WindowAttentionV2 for b in blocks)
        assert list(model.state_dict()) == keys
        with dnn.backend("torch"):
            assert torch.equal(model(x), want)
        with dnn.backend("triton"):
            assert_rel_close(model(x), want, torch.float32, "logits")
    assert dimap_fast.report(model)["flops"] == flops  # the drop-ins' attention is counted too


def test_convert_names_what_it_leaves():
    from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr

    torch.manual_seed(0)
    cr = SwinTransformerV2Cr(img_size=(32, 32), patch_size=2, window_size=4, embed_dim=32,
                             depths=(1, 1), num_heads=(2, 4), num_classes=10)
    with pytest.warns(UserWarning, match=r"left these attention modules .*WindowMultiHeadAttention"):
        assert dnn.convert(cr) is cr  # its prunable Linears are still candidates for SparseLinear


def test_converted_swinv2_scripts_traces_and_compiles(kernel_calls, device):
    from dimap_fast.nn.swinv2 import swinv2_attention_half

    ref = small_swinv2().to(device)
    ours = dnn.convert(copy.deepcopy(ref))
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad(), dnn.backend("torch"), matmul_precision("ieee"):
        want = ref(x)
        torch.testing.assert_close(torch.jit.script(ours)(x), want, atol=1e-5, rtol=1e-5)
        traced = torch.fx.symbolic_trace(ours)
        assert sum(n.target is swinv2_attention_half for n in traced.graph.nodes) == 4  # one per block
        torch.testing.assert_close(traced(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.compile(ours, backend="aot_eager")(x), want, atol=1e-5,
                                   rtol=1e-5)
    with torch.no_grad(), dnn.backend("triton"), matmul_precision("ieee"):
        assert_rel_close(traced(x), want, torch.float32, "traced logits")  # the graph picks it
    assert kernel_calls["window_attention"] == 4
