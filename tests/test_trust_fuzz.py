"""Fuzzing: random layers through scoring and selection, mutated checkpoints through the loader and the CLI.

Scoring and selection are compared with tests/reference.py (a literal Eq. 10) over random shapes,
dtypes, ties, zeros and denormals. Mutated files (bytes flipped, cut or inserted) must give a state
dict or a DimapError (CLI: exit 2, one line), never another exception, a crash or a hang.
"""

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import Reference
from safetensors.torch import save
from statedicts import make_state

import dimap_fast
from dimap_fast import DimapError
from dimap_fast.cli import main
from dimap_fast.io.checkpoint import load_pruned, load_state_dict

NAMES = [
    "layers.0.blocks.0.attn.qkv.weight", "layers.0.blocks.0.attn.proj.weight",
    "layers.0.blocks.0.mlp.fc1.weight", "layers.0.blocks.0.mlp.fc2.weight",
    "layers.1.blocks.0.attn.qkv.weight", "layers.1.blocks.0.mlp.fc1.weight",
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the smallest positive subnormal-range values each dtype can hold
DENORMAL = {torch.float32: 1e-40, torch.float16: 1e-7, torch.bfloat16: 1e-40}
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layer_states(draw, dtypes=DTYPES):
    """A Swin-named state dict: 1 to 6 layers of random small shapes, values full of ties, zeros, denormals."""
    dtype = draw(st.sampled_from(dtypes))
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=len(NAMES), unique=True))
    tiny = DENORMAL[dtype]
    pool = st.sampled_from([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, 0.25, tiny, -tiny, 2 * tiny, 3.0, -3.0])
    values = pool | st.floats(-8, 8, allow_nan=False, width=32)
    state = {}
    for name in sorted(names, key=NAMES.index):  # model order
        rows, cols = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        flat = draw(st.lists(values, min_size=rows * cols, max_size=rows * cols))
        state[name] = torch.tensor(flat, dtype=torch.float32).reshape(rows, cols).to(dtype)
    return state


ratios = st.lists(st.floats(0, 0.999, allow_nan=False), min_size=1, max_size=3)


@FAST
@given(state=layer_states(), method=st.sampled_from(["dimap", "global", "uniform"]), rs=ratios)
def test_masks_equal_the_literal_reference(state, method, rs):
    plan = dimap_fast.plan(state, method=method)
    ref = Reference(state, method)
    for ratio in rs:
        got, expected = plan.masks(ratio), ref.masks(ratio)
        assert sorted(got) == sorted(expected)
        for name in expected:
            assert torch.equal(got[name], expected[name]), f"{method} r={ratio}: {name}"
        removed = {m: 1 - sum(int(got[l.name].sum()) for l in plan.layers if l.module == m)
                   / sum(l.numel for l in plan.layers if l.module == m) for m in plan.modules}
        assert removed == pytest.approx(plan.sparsity(ratio)["modules"], abs=1e-12)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=layer_states(dtypes=[torch.float32]), method=st.sampled_from(["dimap", "global", "uniform"]),
       ratio=st.floats(0, 0.999, allow_nan=False))
def test_gpu_path_equals_cpu_path_for_fp32(state, method, ratio, device):
    """backend='triton' (CUDA, or the interpreter) against backend='numpy', on fp32 with ties and denormals."""
    cpu = dimap_fast.plan(state, method=method, backend="numpy").masks(ratio)
    gpu = dimap_fast.plan({k: v.to(device) for k, v in state.items()}, method=method, backend="triton").masks(ratio)
    for name in cpu:
        assert torch.equal(cpu[name], gpu[name].cpu()), name


# ---- mutated checkpoints --------------------------------------------------------------------------------------------

SMALL = {"layers.0.blocks.0.attn.qkv.weight": (12, 4), "layers.0.blocks.0.attn.proj.weight": (4, 4),
         "layers.0.blocks.0.mlp.fc1.weight": (16, 4), "layers.0.blocks.0.mlp.fc2.weight": (4, 16)}


def _valid_files():
    state = make_state(SMALL, seed=5)
    buf = io.BytesIO()
    torch.save(state, buf)
    return save(state, metadata={"timm_model": "", "note": "fuzz"}), buf.getvalue()


SAFE, PTH = _valid_files()
SAFE_HEADER_END = 8 + int.from_bytes(SAFE[:8], "little")


@st.composite
def mutated(draw, data: bytes, hot_end: int):
    """``data`` with 1 to 4 edits: a byte set, a cut, or bytes inserted; half of the edits fall in data[:hot_end]."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not out:
            break
        end = min(hot_end, len(out)) if draw(st.booleans()) else len(out)
        pos = draw(st.integers(0, max(0, end - 1)))
        op = draw(st.sampled_from(["set", "cut", "insert"]))
        if op == "set":
            out[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del out[pos:]
        else:
            out[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(out)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _load_or_refuse(work, data: bytes, suffix: str):
    path = work / f"m{suffix}"
    path.write_bytes(data)
    try:
        state, meta = load_state_dict(path)
        assert isinstance(state, dict) and isinstance(meta, dict)
        assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
        dimap_fast.plan(state).masks(0.5)  # what loads must prune or be refused too
    except DimapError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated(SAFE, SAFE_HEADER_END))
def test_mutated_safetensors_load_or_give_dimap_error(work, data):
    _load_or_refuse(work, data, ".safetensors")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated(PTH, len(PTH)))
def test_mutated_pth_load_or_give_dimap_error(work, data):
    _load_or_refuse(work, data, ".pth")


def _header_file(work, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path = work / "crafted.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("header,data", [
    ({"w": {"dtype": "F32", "shape": [1 << 31, 1 << 31], "data_offsets": [0, 16]}}, bytes(16)),  # huge shape
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}}, bytes(16)),  # offsets past the end
    ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, bytes(16)),
    ({"w": {"dtype": "NOPE", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, bytes(16)),
    ({"__metadata__": {"a": 1}}, b""),  # metadata values must be strings
    ([1, 2, 3], b""),
], ids=["huge shape", "offsets past end", "negative shape", "unknown dtype", "reversed offsets", "bad metadata", "not a dict"])
def test_crafted_safetensors_headers_are_refused_without_allocating(work, header, data):
    with pytest.raises(DimapError, match="not a valid safetensors file"):
        load_state_dict(_header_file(work, header, data))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(mutated(SAFE, SAFE_HEADER_END).map(lambda d: (d, ".safetensors")),
                      mutated(PTH, len(PTH)).map(lambda d: (d, ".pth"))))
def test_cli_on_mutated_checkpoints_exits_0_or_2_with_one_line(work, data):
    raw, suffix = data
    folder = work / "cli"
    folder.mkdir(exist_ok=True)
    src, out = folder / f"in{suffix}", folder / "out.safetensors"
    src.write_bytes(raw)
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["prune", str(src), "--ratio", "0.5", "--out", str(out)])
    assert code in (0, 2)
    assert src.read_bytes() == raw  # the input is never modified
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]
    if code == 2:
        lines = [ln.split("\r")[-1] for ln in err.getvalue().split("\n") if ln.split("\r")[-1].strip()]
        assert len(lines) == 1 and lines[0].startswith("dimap-fast: error: "), err.getvalue()
        assert not out.exists()
    else:  # a mutation may rename a layer (a byte of its key) or change values: still a complete output
        state, masks, _ = load_pruned(out)
        assert masks and set(masks) <= set(state)
        assert all(bool((state[k][~m] == 0).all()) for k, m in masks.items())
