"""A converted Swin does what users do with any timm model: train, script, trace, compile,
extract features, resize, build on the meta device; each against the unconverted model."""

import copy
import io

import pytest
import torch
from timm.models import _features, _features_fx
from timm.models import swin_transformer as timm_swin

import dimap_fast.nn as dnn
from dimap_fast.nn.derived_linear import derived_linear_forward
from dimap_fast.nn.swin_block import swin_attention_half
from test_modules import block_prune, grads_of, small_swin  # the models test_nn converts
from tolerances import assert_close, assert_rel_close, matmul_precision

SMALL = dict(patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
             num_classes=10)


def pair(img_size=32):
    """(timm model, converted copy): block-pruned, so the MLPs are SparseLinears."""
    ref = block_prune(small_swin(img_size))
    ours = dnn.convert(copy.deepcopy(ref), choose="kernel")
    assert any(isinstance(m, dnn.SparseLinear) for m in ours.modules())
    return ref, ours


def seeded_grads(model, x):
    torch.manual_seed(0)  # the same drop-path draws for both models in train mode
    return grads_of(model, x)


def same_grads(got, want):
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)


def triton_forward_matches(model, ref, x, kernel_calls):
    """``model`` (converted, maybe traced or compiled) under backend "triton" runs both kernels
    and gives ``ref``'s logits."""
    with torch.no_grad(), matmul_precision("ieee"):
        want = ref(x)
        with dnn.backend("triton"):
            got = model(x)
    assert kernel_calls["window_attention"] and kernel_calls["block_sparse_linear"]
    assert_close(got, want)


def test_eager_forward_and_backward_on_cpu():
    ref, ours = pair()
    ref.train(), ours.train()
    x = torch.randn(2, 3, 32, 32)
    same_grads(seeded_grads(ours, x), seeded_grads(ref, x))


def test_training_through_the_fused_attention(device, kernel_calls):
    # Backend "triton" trains the attention but refuses autograd through SparseLinear: dense model.
    ref = small_swin(img_size=16).to(device).train()
    ours = dnn.convert(copy.deepcopy(ref))
    x = torch.randn(1, 3, 16, 16, device=device)
    with matmul_precision("ieee"):
        want = seeded_grads(ref, x)
        with dnn.backend("triton"):
            got = seeded_grads(ours, x)
    assert kernel_calls["window_attention"] == 4 and set(got) == set(want)
    for name in want:
        assert_rel_close(got[name], want[name], torch.float32, name)


@torch.no_grad()
def test_torchscript():
    ref, ours = pair()
    scripted = torch.jit.script(ours)
    x = torch.randn(2, 3, 32, 32)
    want = ref(x)
    torch.testing.assert_close(scripted(x), want, atol=1e-5, rtol=1e-5)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)  # no Python left in the graph: it saves and loads
    buf.seek(0)
    torch.testing.assert_close(torch.jit.load(buf)(x), want, atol=1e-5, rtol=1e-5)
    # Scripting leaves the Python model as it was: still converted, fast path included.
    assert type(ours.layers[0].blocks[0]) is dnn.SwinBlock


def test_fx_trace_forward_backward_and_run_time_backend(kernel_calls, device):
    ref, ours = pair()
    ref.train(), ours.train()  # before tracing: FX bakes in drop path's train/eval branch
    traced = torch.fx.symbolic_trace(ours)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert targets.count(swin_attention_half) == 4  # each block's attention half
    assert targets.count(derived_linear_forward) == 8  # each MLP's two SparseLinears
    x = torch.randn(2, 3, 32, 32)
    same_grads(seeded_grads(traced, x), seeded_grads(ref, x))
    assert not any(kernel_calls.values())
    # Traced under "auto", run under "triton": the backend is read when the graph runs.
    small_ref, small = (m.to(device) for m in pair(img_size=16))
    triton_forward_matches(torch.fx.symbolic_trace(small), small_ref,
                           torch.randn(1, 3, 16, 16, device=device), kernel_calls)


@pytest.mark.parametrize("family", ["v1", "v2"])
@torch.no_grad()
def test_timm_fx_trace_then_torchscript(family, kernel_calls, device):
    # What timm's test_model_forward_fx_torchscript does to every Swin: trace with timm's fx
    # tools (its leaf modules), script the graph, compare with the unconverted model.
    from timm.layers import _fx
    from test_swinv2 import small_swinv2

    ref = (pair()[0] if family == "v1" else small_swinv2()).eval()
    ours = dnn.convert(copy.deepcopy(ref), **({"choose": "kernel"} if family == "v1" else {}))
    last = _fx.get_graph_node_names(ours)[1][-1]
    traced = _fx.create_feature_extractor(ours, [last])
    x = torch.randn(2, 3, *ref.patch_embed.img_size)
    want = ref(x)
    scripted = torch.jit.script(traced)
    assert_close(scripted(x)[last], want)
    assert not any(kernel_calls.values())
    # The traced graph keeps each drop-in whole, so run in Python it still picks the kernels.
    ref, traced = ref.to(device), traced.to(device)
    with dnn.backend("triton"), matmul_precision("ieee"):
        got = traced(x.to(device))[last]
    assert kernel_calls["window_attention"] and (family == "v2" or kernel_calls["block_sparse_linear"])
    with matmul_precision("ieee"):
        assert_close(got, ref(x.to(device)))


def test_torch_compile(kernel_calls, device):
    # A quick backend (inductor gives the same logits too, after a minute of compiling on a CPU).
    torch._dynamo.reset()
    breaks = torch._dynamo.utils.counters["graph_break"]
    breaks.clear()
    ref, ours = (m.to(device) for m in pair(img_size=16))
    x = torch.randn(1, 3, 16, 16, device=device)
    compiled = torch.compile(ours, backend="aot_eager")
    with torch.no_grad(), dnn.backend("torch"), matmul_precision("ieee"):
        torch.testing.assert_close(compiled(x), ref(x), atol=1e-5, rtol=0)
    # The backend decision and the torch path trace as one graph: no graph break.
    assert not breaks
    assert not any(kernel_calls.values())
    # Switching the backend recompiles (dynamo guards on it); the kernels then run inside the
    # compiled model, eagerly behind a graph break.
    triton_forward_matches(compiled, ref, x, kernel_calls)
    assert breaks
    torch._dynamo.reset()


@torch.no_grad()
def test_feature_extraction():
    ref, ours = pair()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=0)
    final, inter = ours.forward_intermediates(x)
    want_final, want_inter = ref.forward_intermediates(x)
    torch.testing.assert_close([final, *inter], [want_final, *want_inter], atol=1e-5, rtol=0)
    # timm's three features_only wrappers: hooks on flattened stages, forward_intermediates, FX.
    for wrap in (lambda m: _features.FeatureListNet(m, out_indices=(0, 1), flatten_sequential=True),
                 lambda m: _features.FeatureGetterNet(m, out_indices=(0, 1)),
                 lambda m: _features_fx.FeatureGraphNet(m, out_indices=(0, 1))):
        ref, ours = pair()
        torch.testing.assert_close(wrap(ours)(x), wrap(ref)(x), atol=1e-5, rtol=0)


@torch.no_grad()
def test_set_input_size():
    ref, ours = pair()
    for m in (ref, ours):
        m.set_input_size(img_size=(48, 40))  # windows scale with the grid; masks, indices rebuilt
    assert ours.layers[0].blocks[0].attn.window_size != (4, 4)
    x = torch.randn(1, 3, 48, 40)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


@torch.no_grad()
def test_meta_device_build_convert_materialize():
    def build(convert):
        with torch.device("meta"):
            m = timm_swin.SwinTransformer(img_size=32, **SMALL)
        if convert:
            dnn.convert(m)  # meta Linears have no zeros to count: they stay dense
        m.to_empty(device="cpu")
        torch.manual_seed(1)
        m.init_weights()  # parameters, and the buffers (position index, shift mask) recomputed
        return m.eval()

    ref, ours = build(False), build(True)
    attn = ours.layers[0].blocks[1].attn
    assert type(ours.layers[0].blocks[1]) is dnn.SwinBlock and type(attn) is dnn.WindowAttention
    assert torch.equal(attn.relative_position_index, timm_swin.get_relative_position_index(4, 4))
    assert not any(isinstance(m, dnn.SparseLinear) for m in ours.modules())
    x = torch.randn(2, 3, 32, 32)
    got = ours(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref(x), atol=1e-5, rtol=0)
    # Pruned after materializing: converting again swaps the sparse Linears in.
    block_prune(ours)
    assert any(isinstance(m, dnn.SparseLinear) for m in dnn.convert(ours, choose="kernel").modules())
