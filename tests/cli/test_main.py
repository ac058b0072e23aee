"""The command line end to end, in a temporary folder: outputs, tables, and clean refusals."""

import csv
import hashlib
import json
import pickle

import pytest
import torch
from statedicts import make_state
from safetensors.torch import save_file

from dimap_fast.cli import main
from dimap_fast.io.checkpoint import load_pruned

TINY = "swin_tiny_patch4_window7_224"


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, swin_tiny_state):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in swin_tiny_state.items()}, str(path))
    return path


def test_prune_checkpoint_then_report(tiny_ckpt, tmp_path, capsys):
    before = sha(tiny_ckpt)
    out = tmp_path / "tiny50.safetensors"
    assert main(["prune", str(tiny_ckpt), "--model", TINY, "--ratio", "0.5", "--out", str(out)]) == 0
    assert sha(tiny_ckpt) == before  # the input is never touched
    state, masks, meta = load_pruned(out)
    assert meta["method"] == "dimap" and meta["timm_model"] == TINY
    assert len(masks) == 48
    for name, mask in masks.items():
        assert torch.equal(state[name] == 0, ~mask | (state[name] == 0))
        assert (state[name][~mask] == 0).all()
    printed = capsys.readouterr().out
    assert "MLP-M" in printed and "50.00%" in printed
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "FLOPs" in table and "QKV-M" in table and "50.00%" in table
    assert main(["report", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["modules"]["PRJ-M"]["sparsity"] == 0.5
    assert rep["flops"]["dense"] == 4_490_566_656


def test_prune_refuses_to_overwrite_input_or_existing_output(tiny_ckpt, tmp_path, capsys):
    assert main(["prune", str(tiny_ckpt), "--ratio", "0.5", "--out", str(tiny_ckpt), "--overwrite"]) == 2
    assert "input" in capsys.readouterr().err
    existing = tmp_path / "x.safetensors"
    existing.write_bytes(b"keep me")
    assert main(["prune", str(tiny_ckpt), "--ratio", "0.5", "--out", str(existing)]) == 2
    assert existing.read_bytes() == b"keep me"


def test_sweep_writes_one_file_per_pair_and_resumes(tmp_path, capsys):
    state = make_state({
        "layers.0.blocks.0.attn.qkv.weight": (48, 16), "layers.0.blocks.0.attn.proj.weight": (16, 16),
        "layers.0.blocks.0.mlp.fc1.weight": (64, 16), "layers.0.blocks.0.mlp.fc2.weight": (16, 64),
    })
    src = tmp_path / "small.safetensors"
    save_file(state, str(src))
    out = tmp_path / "sweep"
    args = ["sweep", str(src), "--ratios", "0.15,0.35,0.55", "--methods", "dimap,uniform", "--out-dir", str(out)]
    assert main(args) == 0
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) == 6
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 6 and {r["method"] for r in rows} == {"dimap", "uniform"}
    assert abs(float(rows[0]["MLP-M"]) - 0.15) < 1e-3
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    assert main(args) == 0  # a rerun keeps what exists
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == stamp
    assert "kept (exists)" in capsys.readouterr().out


def _bad_inputs(tmp_path):
    nan_state = make_state({"layers.0.blocks.0.mlp.fc1.weight": (8, 8)})
    nan_state["layers.0.blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    save_file(nan_state, str(tmp_path / "nan.safetensors"))
    save_file({"conv.weight": torch.randn(4, 4), "fc.weight": torch.randn(2, 4)}, str(tmp_path / "cnn.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00not a safetensors file" * 10)
    good = tmp_path / "good.safetensors"
    save_file(make_state({"layers.0.blocks.0.mlp.fc1.weight": (8, 8)}), str(good))
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[:-40])

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"layers.0.blocks.0.mlp.fc1.weight": Evil()}, f)
    return {
        "ratio 1.5": ["prune", TINY, "--ratio", "1.5"],
        "ratio nan": ["prune", TINY, "--ratio", "nan"],
        "unknown model": ["prune", "swin_nonexistent_model", "--ratio", "0.5"],
        "missing checkpoint": ["prune", str(tmp_path / "missing.safetensors"), "--ratio", "0.5"],
        "corrupt checkpoint": ["prune", str(tmp_path / "garbage.safetensors"), "--ratio", "0.5"],
        "truncated checkpoint": ["prune", str(tmp_path / "truncated.safetensors"), "--ratio", "0.5"],
        "pickled code": ["prune", str(tmp_path / "evil.pth"), "--ratio", "0.5"],
        "nan weights": ["prune", str(tmp_path / "nan.safetensors"), "--ratio", "0.5"],
        "no swin modules": ["prune", str(tmp_path / "cnn.safetensors"), "--ratio", "0.5"],
        "unknown method": ["prune", TINY, "--ratio", "0.5", "--method", "random"],
    }


def test_bad_input_gets_one_line_exit_2_and_no_output(tmp_path, capsys):
    for label, args in _bad_inputs(tmp_path).items():
        out = tmp_path / f"out_{label.replace(' ', '_')}.safetensors"
        code = main(args + ["--out", str(out)]) if "--method" not in args else main(args[:3] + ["--out", str(out)] + args[3:])
        err = capsys.readouterr()
        assert code == 2, label
        last = [line for line in err.err.strip().splitlines() if line]
        assert last and "error" in last[-1], label
        assert "code ran" not in err.out, label
        assert not out.exists(), label
        assert not list(tmp_path.glob(".*.tmp")), label
