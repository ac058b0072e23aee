"""backend.py: the one decision (kernel or torch), and the walk from a block's attention half to
the kernel launch that the README's layout section describes."""

import copy
import inspect
import sys
from pathlib import Path

import pytest
import torch

import dimap_fast.nn as dnn
from dimap_fast.errors import DimapError
from dimap_fast.nn.backend import runs_fast_path
from test_modules import small_swin
from test_swinv2 import small_swinv2

ROOT = Path(__file__).resolve().parents[2]


def _project_frames_to_launch(block, x, monkeypatch) -> list:
    """(file, function) of every project frame from ``block._attn`` to the kernel launch."""
    import dimap_fast.kernels  # noqa: F401  (the package binds its window_attention to the function)

    wa = sys.modules["dimap_fast.kernels.window_attention"]
    seen = []
    real = wa._launch

    def recording(*a, **kw):
        if not seen:
            seen.extend((Path(f.filename).resolve(), f.function) for f in inspect.stack()[1:])
        return real(*a, **kw)

    monkeypatch.setattr(wa, "_launch", recording)
    with torch.no_grad(), dnn.backend("triton"):
        block._attn(x)
    assert seen, "the kernel was not launched"
    ours = [(p.relative_to(ROOT).as_posix(), fn) for p, fn in seen
            if p.is_relative_to(ROOT) and p.relative_to(ROOT).parts[0] in ("dimap_fast", "kernels")]
    start = next(i for i, (_, fn) in enumerate(ours) if fn == "_attn")
    return list(reversed(ours[:start + 1])) + [("kernels/window_attention.py", "_launch")]


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_attention_half_reaches_the_launch_in_three_calls(family, monkeypatch):
    model = small_swin() if family == "v1" else small_swinv2()
    ours = dnn.convert(copy.deepcopy(model), **({"choose": "kernel"} if family == "v1" else {}))
    block = ours.layers[0].blocks[1]  # the shifted one
    x = torch.randn(1, 8, 8, block.attn.qkv.in_features)
    walk = _project_frames_to_launch(block, x, monkeypatch)
    module_file = "dimap_fast/nn/swin_block.py" if family == "v1" else "dimap_fast/nn/swinv2.py"
    leaf = "swin_attention_half" if family == "v1" else "swinv2_attention_half"
    assert walk == [(module_file, "_attn"), (module_file, leaf),
                    ("kernels/window_attention.py", "forward"),
                    ("kernels/window_attention.py", "_launch")], walk
    assert len(walk) - 1 <= 3 and len({f for f, _ in walk}) == 2


def test_the_decision():
    block = dnn.convert(small_swin(), choose="kernel").layers[0].blocks[0]
    x = torch.randn(1, 8, 8, block.attn.qkv.in_features)
    assert not runs_fast_path(block, x)  # "auto": CPU tensors take timm's code
    with dnn.backend("triton"):
        assert runs_fast_path(block, x)
        block.attn.train(), setattr(block.attn.attn_drop, "p", 0.1)
        assert not runs_fast_path(block, x)  # attention dropout: timm only, whatever the backend
        block.attn.eval()
        linear = dnn.SparseLinear.from_linear(torch.nn.Linear(32, 32), block=16)
        with pytest.raises(RuntimeError, match="forward-only"):
            runs_fast_path(linear, torch.randn(2, linear.in_features, requires_grad=True))
        with pytest.raises(DimapError, match="block-sparse kernel takes"):
            runs_fast_path(linear, torch.randn(2, linear.in_features, dtype=torch.float64))
    with dnn.backend("torch"):
        assert not runs_fast_path(block, x)


def test_under_torch_compile_the_kernel_runs_eagerly_behind_a_graph_break(kernel_calls):
    # dynamo traces the decision and the Linears; the autograd Function's forward is disabled for
    # it (the launchers read data pointers), so it runs eagerly, with and without gradients
    block = dnn.convert(small_swin(), choose="kernel").layers[0].blocks[1]
    x = torch.randn(1, 8, 8, block.attn.qkv.in_features)
    with dnn.backend("triton"):
        with torch.no_grad():
            want = block._attn(x)
            got = torch.compile(block._attn, backend="aot_eager", fullgraph=False)(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        calls = kernel_calls["window_attention"]
        assert calls == 2
        grads = []
        for run in (block._attn, torch.compile(block._attn, backend="aot_eager")):
            xg = x.clone().requires_grad_()
            run(xg).square().sum().backward()
            grads.append(xg.grad)
        assert kernel_calls["window_attention"] == 4
        torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)
