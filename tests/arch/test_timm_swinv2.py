"""timm SwinV2 (a tiny SwinTransformerV2): exact masks, the channel pattern with v2's q/v biases,
and shrink (logit scales, the position-bias MLP's rows and the head count follow the heads)."""

import copy
import warnings

import numpy as np
import pytest
import torch
from reference import literal_unit_keep, reference_masks
from timm.models import swin_transformer_v2 as timm_v2

import dimap_fast
from dimap_fast import DimapError
from dimap_fast.arch import find_adapter
from dimap_fast.nn.swinv2 import SwinV2Block, WindowAttentionV2
from dimap_fast.shrink import block_sizes, resize, shrink

CONFIG = dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10)
HEADS = [2, 2, 4, 4]


def small_v2(seed=0):
    torch.manual_seed(seed)
    model = timm_v2.SwinTransformerV2(**CONFIG)
    with torch.no_grad():  # timm starts q/v biases at zero, logit scales at log 10 and the post-norms
        for name, p in model.named_parameters():  # at zero (a block adds nothing): make them matter
            if name.endswith(("q_bias", "v_bias", "logit_scale")):
                p.normal_(std=0.5)
            elif name.endswith(("norm1.weight", "norm2.weight")):
                p.normal_(1.0, 0.2)
        model.head.fc.weight.normal_()  # logits of order one, so that tolerances mean something
    return model.eval()


@pytest.mark.parametrize("method", ["dimap", "global", "uniform"])
def test_masks_equal_the_reference(method):
    model = small_v2()
    state = model.state_dict()
    assert find_adapter(model).name == "timm-swinv2" and find_adapter(state).name == "timm-swinv2"
    plan = dimap_fast.plan(model, method=method)
    for ratio in (0.25, 0.5, 0.9):
        masks, expect = plan.masks(ratio), reference_masks(state, ratio, method)
        assert masks.keys() == expect.keys() and len(masks) == 16
        for name in expect:
            assert torch.equal(masks[name], expect[name]), name


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_channel_heads_count_q_and_v_biases(ratio):
    model = small_v2(1)
    sd = model.state_dict()
    masks = dimap_fast.compute_masks(model, ratio, pattern="channel")
    blocks = sorted({n.rsplit(".attn", 1)[0] for n in sd if n.endswith("attn.qkv.weight")})
    energies = []
    for b, nh in zip(blocks, HEADS):
        wq, wp = sd[f"{b}.attn.qkv.weight"].double(), sd[f"{b}.attn.proj.weight"].double()
        qb, vb = sd[f"{b}.attn.q_bias"].double(), sd[f"{b}.attn.v_bias"].double()
        dim = wp.shape[0]
        hd = dim // nh
        e = []
        for h in range(nh):
            own = slice(h * hd, (h + 1) * hd)
            rows = [p * dim + h * hd + i for p in range(3) for i in range(hd)]
            e.append(float((wq[rows] ** 2).sum() + (qb[own] ** 2).sum() + (vb[own] ** 2).sum() + (wp[:, own] ** 2).sum()))
        energies.append(e)
    for b, keep in zip(blocks, literal_unit_keep(energies, ratio, floor_one=True)):
        dim = sd[f"{b}.attn.proj.weight"].shape[0]
        cols = torch.from_numpy(keep).repeat_interleave(dim // len(keep))
        assert torch.equal(masks[f"{b}.attn.proj.weight"], cols[None, :].expand(dim, dim))
        assert torch.equal(masks[f"{b}.attn.qkv.weight"], cols.repeat(3)[:, None].expand(3 * dim, dim))


def test_shrunk_v2_equals_masked_and_reloads():
    model = small_v2(2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = model(x)
        dimap_fast.plan(model, pattern="channel").prune_(0.6)
        masked = model(x)
        small = shrink(copy.deepcopy(model))
        out = small(x)
    assert (masked - dense).abs().max() > 1e-3
    assert (out - masked).abs().max() < 1e-5
    assert sum(p.numel() for p in small.parameters()) < 0.8 * sum(p.numel() for p in model.parameters())
    sizes = block_sizes(small)
    assert [s["heads"] for s in sizes.values()] != HEADS and all(s["hidden"] % 8 == 0 for s in sizes.values())
    attn = small.layers[1].blocks[0].attn
    assert type(attn) is WindowAttentionV2 and attn.num_heads == sizes["layers.1.blocks.0"]["heads"]
    assert attn.logit_scale.shape[0] == attn.cpb_mlp[2].out_features == attn.num_heads == attn.k_bias.numel() // 16
    fresh = resize(timm_v2.SwinTransformerV2(**CONFIG).eval(), sizes)
    fresh.load_state_dict(small.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_shrunk_v2_converts_with_the_masked_logits(device):
    # one attention class for shrunk and converted v2: its torch path reshapes to its own width
    import dimap_fast.nn as dnn
    from tolerances import assert_rel_close, matmul_precision

    model = small_v2(3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), matmul_precision("ieee"):
        dimap_fast.plan(model, pattern="channel").prune_(0.6)
        masked = model(x)
        small = shrink(copy.deepcopy(model))
        heads = [s["heads"] for s in block_sizes(small).values()]
        assert heads != HEADS
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing is left on its own code
            dnn.convert(small, choose="dense")
        blocks = [m for m in small.modules() if isinstance(m, timm_v2.SwinTransformerV2Block)]
        assert [type(b) for b in blocks] == [SwinV2Block] * 4 and [b.attn.num_heads for b in blocks] == heads
        assert all(type(b.attn) is WindowAttentionV2 for b in blocks)
        with dnn.backend("torch"):
            assert (small(x) - masked).abs().max() < 1e-5
        small, x = small.to(device), x.to(device)
        with dnn.backend("triton"):  # the fused kernel on the shrunk heads
            assert_rel_close(small(x).cpu(), masked, torch.float32, "logits")


def test_swinv2_cr_is_not_shrunk():
    from timm.models import swin_transformer_v2_cr as cr

    model = cr.SwinTransformerV2Cr(img_size=(32, 32), patch_size=2, window_size=4, embed_dim=16, depths=(1, 1),
                                   num_heads=(2, 4), num_classes=10)
    dimap_fast.plan(model, pattern="channel").prune_(0.5)  # its heads are grouped as v2's
    with pytest.raises(DimapError, match="swinv2_cr"):
        shrink(model)


def test_report_of_a_pruned_and_a_shrunk_v2():
    model = small_v2(3)
    dense = dimap_fast.report(model)
    handle = dimap_fast.prune_(model, 0.5)
    rep = dimap_fast.report(model)
    assert set(rep["modules"]) == {"QKV-M", "PRJ-M", "MLP-M"}
    for name, m in rep["modules"].items():  # DIMAP: each module loses round(ratio x its weights)
        assert m["zeros"] == int(np.floor(0.5 * m["weights"] + 0.5)), name
    # a zeroed weight removes one multiply-add per position its layer runs (4x4 patches: stage 0
    # runs 256 tokens, stage 1 runs 64); the q/k and attention-times-v matmuls stay
    positions = {0: 256, 1: 64}
    removed = sum(r["zeros"] * positions[int(name.split(".")[1])] for name, r in rep["layers"].items())
    assert rep["flops"]["dense"] == dense["flops"]["dense"]
    assert rep["flops"]["pruned"] == dense["flops"]["dense"] - removed
    handle.remove()
    model = small_v2(3)
    plan = dimap_fast.plan(model, pattern="channel")
    predicted = plan.flops_reduction(0.6)  # asked before prune_ changes the planned weights
    plan.prune_(0.6)
    small = shrink(copy.deepcopy(model))
    got = dimap_fast.report(small)["flops"]
    assert got["pruned"] < got["dense"]  # the zero neurons that round MLP widths up to 8 still count out
    assert got["dense"] == round((1 - predicted) * dense["flops"]["dense"])
