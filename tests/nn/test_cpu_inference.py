"""The drop-in Swin block's CPU inference path (dimap_fast/nn/cpu_inference.py): it gives timm's
logits, it runs where it should, and timm's own forward runs everywhere else."""

import copy

import pytest
import torch
from timm.models import swin_transformer as timm_swin

import dimap_fast
import dimap_fast.nn as dnn
from dimap_fast.nn import cpu_inference
from test_modules import block_prune, small_swin
from tolerances import assert_close


@pytest.fixture
def path_calls(monkeypatch):
    """How many block forwards took the CPU inference path."""
    calls = []
    real = dnn.SwinBlock._cpu_forward
    monkeypatch.setattr(dnn.SwinBlock, "_cpu_forward", lambda block, x: calls.append(x.shape) or real(block, x))
    return calls


def pair(img_size=32, **kw):
    ref = small_swin(img_size) if not kw else _swin(img_size, **kw)
    return ref, dnn.convert(copy.deepcopy(ref), choose="dense")


def _swin(img_size, **kw):
    torch.manual_seed(0)
    model = timm_swin.SwinTransformer(img_size=img_size, patch_size=2, window_size=4, embed_dim=32,
                                      depths=(2, 2), num_heads=(2, 4), num_classes=10, **kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, timm_swin.WindowAttention):
                m.relative_position_bias_table.normal_()
    return model.eval()


@pytest.mark.parametrize("h,w,window,shift", [(8, 8, (4, 4), (2, 2)), (8, 12, (4, 4), (0, 0)),
                                              (12, 8, (4, 4), (2, 2)), (8, 8, (4, 2), (2, 1))])
def test_window_order_is_roll_then_partition(h, w, window, shift):
    x = torch.arange(h * w, dtype=torch.float32).view(1, h, w, 1)
    want = timm_swin.window_partition(torch.roll(x, (-shift[0], -shift[1]), dims=(1, 2)), window)
    order = cpu_inference.window_order(h, w, window, shift)
    assert torch.equal(x.reshape(-1)[order], want.reshape(-1))


@pytest.mark.parametrize("batch,rows", [(1, cpu_inference.ROWS), (3, cpu_inference.ROWS), (3, 512)],
                         ids=["one-image", "one-chunk", "chunks-2+1"])
@torch.no_grad()
def test_logits_are_timms(batch, rows, monkeypatch, path_calls):
    monkeypatch.setattr(cpu_inference, "ROWS", rows)  # 512: two 16x16 maps per chunk, then one
    ref, ours = pair()
    x = torch.randn(batch, 3, 32, 32)
    assert_close(ours(x), ref(x))
    assert len(path_calls) == 4  # every block of both stages, shifted and not


@pytest.mark.parametrize("epilogue_rows", [0, 10**9], ids=["torch-linear", "onednn-epilogue"])
@pytest.mark.parametrize("img_size", [32, 16], ids=["gathers", "one-window-last-map"])
@torch.no_grad()
def test_both_linear_paths_give_timms_logits(epilogue_rows, img_size, monkeypatch, path_calls):
    monkeypatch.setattr(cpu_inference, "EPILOGUE_ROWS", epilogue_rows)
    ref, ours = pair(img_size)
    x = torch.randn(3, 3, img_size, img_size)
    assert_close(ours(x), ref(x))
    assert len(path_calls) == 4
    last = [cpu_inference._cache[b][1] for b in ours.layers[1].blocks]  # the blocks' token orders
    assert all(o is None for o in last) == (img_size == 16)  # a 4x4 map in windows of 4: no gather


@torch.no_grad()
def test_sparse_linears_run_as_their_modules(path_calls):
    ref = block_prune(small_swin())
    ours = dnn.convert(copy.deepcopy(ref), choose="bsr")
    assert any(isinstance(m, dnn.BsrLinear) for m in ours.modules())
    x = torch.randn(2, 3, 32, 32)
    assert_close(ours(x), ref(x))
    assert len(path_calls) == 4


@torch.no_grad()
def test_a_shrunk_model_keeps_the_masked_logits(path_calls):
    masked = small_swin()
    dimap_fast.plan(masked, pattern="channel").prune_(0.5)
    ours = dnn.convert(dimap_fast.shrink(copy.deepcopy(masked)), choose="dense")
    assert sum(b.mlp.fc1.out_features for b in ours.modules() if isinstance(b, dnn.SwinBlock)) < \
        sum(b.mlp.fc1.out_features for b in masked.modules() if isinstance(b, timm_swin.SwinTransformerBlock))
    x = torch.randn(2, 3, 32, 32)
    assert_close(ours(x), masked(x))
    assert len(path_calls) == 4


@torch.no_grad()
def test_the_cache_follows_the_bias_table_and_the_map_size(path_calls):
    ref, ours = pair(32, strict_img_size=False)  # a mask made per map size
    assert all(b.dynamic_mask for b in ours.modules() if isinstance(b, dnn.SwinBlock))
    for size in (32, 48, 32):
        x = torch.randn(2, 3, size, size)
        assert_close(ours(x), ref(x))
    for model in (ref, ours):
        model.layers[0].blocks[1].attn.relative_position_bias_table.mul_(-2.0)  # in place: same storage
    x = torch.randn(2, 3, 32, 32)
    assert_close(ours(x), ref(x))
    assert len(path_calls) == 16


def _hook(model):
    seen = []
    model.layers[0].blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    return seen


@pytest.mark.parametrize("case", ["train", "grad", "backend-torch", "float64", "hook", "padding", "fx"])
def test_timms_forward_runs_everywhere_else(case, path_calls):
    ref, ours = pair(36 if case == "padding" else 32)  # 36: an 18x18 map, padded to windows of 4
    x = torch.randn(2, 3, 36 if case == "padding" else 32, 36 if case == "padding" else 32)
    if case == "float64":
        ref, ours, x = ref.double(), ours.double(), x.double()
    if case == "train":
        ref.train(), ours.train()
    seen = _hook(ours) if case == "hook" else None
    with torch.set_grad_enabled(case == "grad"), dnn.backend("torch" if case == "backend-torch" else "auto"):
        if case == "fx":
            traced = torch.fx.symbolic_trace(ours)
            assert not any("mkldnn" in str(n.target) for n in traced.graph.nodes)
            ours = traced
        torch.manual_seed(1)  # train: the same drop-path draws for both
        got = ours(x)
        torch.manual_seed(1)
        want = ref(x)
    if case == "hook":  # only the hooked block leaves the path
        assert len(seen) == 1 and len(path_calls) == 3  # the hook fired: its Linear ran as its module
        assert_close(got, want)
    elif case == "padding":  # the blocks leave the path; the stem and the merge (no padding) stay
        assert path_calls == []
        assert_close(got, want)
    else:
        assert torch.equal(got, want), "timm's forward should have run, bit for bit"
        assert path_calls == []


@pytest.mark.parametrize("rows", [cpu_inference.ROWS, 64], ids=["whole-batch", "image-by-image"])
@torch.no_grad()
def test_stem_and_merge_are_timms(rows, monkeypatch):
    monkeypatch.setattr(cpu_inference, "ROWS", rows)  # 64: one image per chunk for both
    ref, ours = pair()
    assert type(ours.patch_embed) is dnn.PatchEmbed and type(ours.layers[1].downsample) is dnn.PatchMerging
    calls = []
    real = dnn.PatchEmbed._cpu_forward
    monkeypatch.setattr(dnn.PatchEmbed, "_cpu_forward", lambda m, x: calls.append(x.shape) or real(m, x))
    x = torch.randn(3, 3, 32, 32)
    assert_close(ours.patch_embed(x), ref.patch_embed(x))
    assert calls == [x.shape]
    tokens = torch.randn(3, 16, 16, 32)
    assert_close(ours.layers[1].downsample(tokens), ref.layers[1].downsample(tokens))


def test_the_stem_leaves_wrong_sizes_to_timm():
    _, ours = pair()
    with torch.no_grad(), pytest.raises(AssertionError, match="Input height"):
        ours(torch.randn(1, 3, 48, 32))  # timm's own message: the model was built for 32x32
