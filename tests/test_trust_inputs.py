"""Every bad input is refused with one line that says what is wrong and what to do, and nothing is written.

The CLI cases run in a folder of small files; after each one every file there has the bytes it had
before (the input included) and no file, temporary or not, was added. docs/bad_inputs.md lists the
same cases and lines.
"""

import argparse
import hashlib
import os
import pickle

import pytest
import torch
from statedicts import make_state
from safetensors.torch import save_file

import dimap_fast
from dimap_fast import DimapError
from dimap_fast.cli import main
from dimap_fast.io.checkpoint import load_pruned, load_state_dict, save_pruned

TINY = "swin_tiny_patch4_window7_224"
FC1 = "layers.0.blocks.0.mlp.fc1.weight"
SHAPES = {
    "layers.0.blocks.0.attn.qkv.weight": (48, 16), "layers.0.blocks.0.attn.proj.weight": (16, 16),
    FC1: (64, 16), "layers.0.blocks.0.mlp.fc2.weight": (16, 64),
}


class Evil:
    def __reduce__(self):
        return (os.system, ("echo code ran > ran.txt",))


def _variant(name, value):
    state = make_state(SHAPES)
    state[name] = value
    return state


def make_files(d):
    good = make_state(SHAPES)
    save_file(good, str(d / "small.safetensors"))
    torch.save(good, d / "small.pth")
    nan = make_state(SHAPES)
    nan[FC1][3, 5] = float("nan")
    save_file(nan, str(d / "nan.safetensors"))
    inf = make_state(SHAPES)
    inf[FC1][0, 0] = float("-inf")
    save_file(inf, str(d / "inf.safetensors"))
    save_file(_variant(FC1, torch.zeros(0, 16)), str(d / "empty_layer.safetensors"))
    save_file(_variant(FC1, torch.ones(64, 16, dtype=torch.int32)), str(d / "int.safetensors"))
    save_file(_variant(FC1, good[FC1].half()), str(d / "mixed.safetensors"))
    save_file({"conv.weight": torch.randn(4, 4), "fc.weight": torch.randn(2, 4)}, str(d / "cnn.safetensors"))
    raw = (d / "small.safetensors").read_bytes()
    (d / "empty.safetensors").write_bytes(b"")
    (d / "truncated.safetensors").write_bytes(raw[:-40])
    (d / "garbage.safetensors").write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"{not json at all, just bytes}   " + bytes(64))
    (d / "huge_header.safetensors").write_bytes((1 << 50).to_bytes(8, "little") + raw[8:])
    pth = (d / "small.pth").read_bytes()
    (d / "truncated.pth").write_bytes(pth[: len(pth) // 2])
    (d / "empty.pth").write_bytes(b"")
    (d / "text.pth").write_bytes(b"this is a text file, not a checkpoint\n")
    torch.save({FC1: Evil()}, d / "evil.pth")
    torch.save({"model": good, "args": argparse.Namespace(lr=0.1)}, d / "namespace.pth")
    with open(d / "plain_pickle.pth", "wb") as f:
        pickle.dump({FC1: Evil()}, f)
    torch.save([1, 2, 3], d / "list.pth")
    (d / "notes.txt").write_text("not a checkpoint\n")
    (d / "folder.safetensors").mkdir()
    (d / "existing.safetensors").write_bytes(b"keep me")


# (id, argv, the one line on stderr); prune cases get "--out out.safetensors" unless they name --out
P = ["prune"]
CLI_CASES = [
    ("ratio above 1", P + [TINY, "--ratio", "1.5"],
     "dimap-fast prune: error: argument --ratio: ratio must be in [0, 1), got 1.5: it is the fraction of weights to remove (see dimap-fast prune --help)"),
    ("ratio 1", P + [TINY, "--ratio", "1"],
     "dimap-fast prune: error: argument --ratio: ratio must be in [0, 1), got 1.0: it is the fraction of weights to remove (see dimap-fast prune --help)"),
    ("negative ratio", P + [TINY, "--ratio", "-0.1"],
     "dimap-fast prune: error: argument --ratio: ratio must be in [0, 1), got -0.1: it is the fraction of weights to remove (see dimap-fast prune --help)"),
    ("ratio nan", P + [TINY, "--ratio", "nan"],
     "dimap-fast prune: error: argument --ratio: ratio must be in [0, 1), got nan: it is the fraction of weights to remove (see dimap-fast prune --help)"),
    ("ratio not a number", P + [TINY, "--ratio", "half"],
     "dimap-fast prune: error: argument --ratio: ratio must be a number in [0, 1), got 'half' (see dimap-fast prune --help)"),
    ("unknown method", P + [TINY, "--ratio", "0.5", "--method", "random"],
     "dimap-fast prune: error: argument --method: invalid choice: 'random' (choose from …dimap…global…uniform…) (see dimap-fast prune --help)"),
    ("unknown pattern", P + [TINY, "--ratio", "0.5", "--pattern", "diagonal"],
     "dimap-fast prune: error: argument --pattern: invalid choice: 'diagonal' (choose from …unstructured…block…channel…2:4…) "
     "(see dimap-fast prune --help)"),
    ("unknown model name", P + ["swin_nonexistent_model", "--ratio", "0.5"],
     "dimap-fast: error: unknown model name 'swin_nonexistent_model': see timm.list_models('swin*')"),
    ("unknown --model", P + ["small.safetensors", "--model", "swin_tiny_patch4_window7", "--ratio", "0.5"],
     "dimap-fast: error: unknown model name 'swin_tiny_patch4_window7' (did you mean swin_tiny_patch4_window7_224, "
     "swin_base_patch4_window7_224, swin_small_patch4_window7_224?): see timm.list_models('swin*')"),
    ("checkpoint of another architecture", P + ["small.safetensors", "--model", TINY, "--ratio", "0.5"],
     "dimap-fast: error: small.safetensors does not fit this architecture: layers.0.blocks.0.attn.proj.weight has shape "
     "(16, 16), the model expects (96, 96); pass the right --model"),
    ("missing checkpoint", P + ["missing.safetensors", "--ratio", "0.5"],
     "dimap-fast: error: checkpoint missing.safetensors not found: check the path"),
    ("folder as checkpoint", P + ["folder.safetensors", "--ratio", "0.5"],
     "dimap-fast: error: folder.safetensors is a folder, not a checkpoint file: name the .safetensors or .pth inside it"),
    ("unknown file type", P + ["notes.txt", "--ratio", "0.5"],
     "dimap-fast: error: notes.txt: unknown checkpoint type '.txt': use .safetensors, .pth or .pt"),
    ("empty safetensors", P + ["empty.safetensors", "--ratio", "0.5"],
     "dimap-fast: error: cannot read empty.safetensors: 0 bytes is too short for a safetensors file: it is truncated; "
     "copy or export it again"),
    ("truncated safetensors", P + ["truncated.safetensors", "--ratio", "0.5"],
     "dimap-fast: error: cannot read truncated.safetensors: not a valid safetensors file (Error while deserializing header: "
     "incomplete metadata, file not fully covered): it is truncated or damaged; copy or export it again"),
    ("corrupt safetensors", P + ["garbage.safetensors", "--ratio", "0.5"],
     "dimap-fast: error: cannot read garbage.safetensors: not a valid safetensors file (…): it is truncated or damaged; "
     "copy or export it again"),
    ("safetensors header overruns the file", P + ["huge_header.safetensors", "--ratio", "0.5"],
     "dimap-fast: error: cannot read huge_header.safetensors: not a valid safetensors file (a header of 1125899906842624 bytes "
     "in a file of …): it is truncated or damaged; copy or export it again"),
    ("truncated .pth", P + ["truncated.pth", "--ratio", "0.5"],
     "dimap-fast: error: cannot read truncated.pth: truncated or not a torch checkpoint (…); copy or export it again"),
    ("empty .pth", P + ["empty.pth", "--ratio", "0.5"],
     "dimap-fast: error: cannot read empty.pth: truncated or not a torch checkpoint (EOFError); copy or export it again"),
    ("text file named .pth", P + ["text.pth", "--ratio", "0.5"],
     "dimap-fast: error: cannot read text.pth: truncated or not a torch checkpoint (…); copy or export it again"),
    ("pickle that runs code", P + ["evil.pth", "--ratio", "0.5"],
     "dimap-fast: error: refused evil.pth: loading it would call posix.system, and a pickle can run code, so weights_only "
     "loading blocks it; if you trust the file, re-save its state dict with safetensors.torch.save_file and prune that"),
    ("plain pickle that runs code", P + ["plain_pickle.pth", "--ratio", "0.5"],
     "dimap-fast: error: refused plain_pickle.pth: loading it … so weights_only loading blocks it; if you trust the file, "
     "re-save its state dict with safetensors.torch.save_file and prune that"),
    ("checkpoint with pickled objects", P + ["namespace.pth", "--ratio", "0.5"],
     "dimap-fast: error: refused namespace.pth: loading it would call argparse.Namespace, and a pickle can run code, so "
     "weights_only loading blocks it; if you trust the file, re-save its state dict with safetensors.torch.save_file and prune that"),
    ("no tensors in .pth", P + ["list.pth", "--ratio", "0.5"],
     "dimap-fast: error: list.pth holds no state dict of tensors: save model.state_dict() instead"),
    ("NaN weights", P + ["nan.safetensors", "--ratio", "0.5"],
     "dimap-fast: error: layers.0.blocks.0.mlp.fc1.weight holds NaN weights: repair or retrain the checkpoint before pruning"),
    ("Inf weights", P + ["inf.safetensors", "--ratio", "0.5"],
     "dimap-fast: error: layers.0.blocks.0.mlp.fc1.weight holds Inf weights: repair or retrain the checkpoint before pruning"),
    ("empty module", P + ["empty_layer.safetensors", "--ratio", "0.5"],
     "dimap-fast: error: layers.0.blocks.0.mlp.fc1.weight is empty (shape (0, 16)): nothing to prune there"),
    ("integer weights", P + ["int.safetensors", "--ratio", "0.5"],
     "dimap-fast: error: layers.0.blocks.0.mlp.fc1.weight has dtype torch.int32: prunable weights must be floating point"),
    ("mixed dtypes", P + ["mixed.safetensors", "--ratio", "0.5"],
     "dimap-fast: error: prunable weights mix dtypes: float32 (layers.0.blocks.0.attn.proj.weight), float16 "
     "(layers.0.blocks.0.mlp.fc1.weight); cast them to one first, e.g. model.float() or "
     "{k: v.float() for k, v in state_dict.items()}"),
    ("not a Swin", P + ["cnn.safetensors", "--ratio", "0.5"],
     "dimap-fast: error: no prunable weight found (looked for *blocks.*.attn.proj.weight, *blocks.*.attn.qkv.weight, "
     "*blocks.*.mlp.fc1.weight, *blocks.*.mlp.fc2.weight): this is not a timm Swin; pass module_map={'MODULE': ['glob', ...]} "
     "for other models"),
    ("output is the input", P + ["small.safetensors", "--ratio", "0.5", "--out", "small.safetensors", "--overwrite"],
     "dimap-fast: error: output small.safetensors is the input checkpoint: choose another --out, the input is never overwritten"),
    ("output exists", P + ["small.safetensors", "--ratio", "0.5", "--out", "existing.safetensors"],
     "dimap-fast: error: existing.safetensors exists: pass --overwrite to replace it, or choose another --out"),
    ("output folder missing", P + ["small.safetensors", "--ratio", "0.5", "--out", "nowhere/out.safetensors"],
     "dimap-fast: error: output folder nowhere does not exist: create it first"),
    ("output not .safetensors", P + ["small.safetensors", "--ratio", "0.5", "--out", "out.pth"],
     "dimap-fast: error: output out.pth must end in .safetensors"),
    ("2:4 at another ratio", P + ["small.safetensors", "--ratio", "0.3", "--pattern", "2:4"],
     "dimap-fast: error: pattern '2:4' always removes half of the weights: use ratio 0.5, not 0.3"),
    ("report of a corrupt file", ["report", "garbage.safetensors"],
     "dimap-fast: error: cannot read garbage.safetensors: not a valid safetensors file (…): it is truncated or damaged; "
     "copy or export it again"),
    ("report with an unknown --model", ["report", "small.safetensors", "--model", "swin_nope"],
     "dimap-fast: error: unknown model name 'swin_nope': see timm.list_models('swin*')"),
    ("report of another architecture", ["report", "small.safetensors", "--model", TINY],
     "dimap-fast: error: small.safetensors does not fit this architecture: layers.0.blocks.0.attn.proj.weight has shape "
     "(16, 16), the model expects (96, 96); pass the right --model"),
    ("sweep: unknown model name", ["sweep", "swin_nope", "--ratios", "0.5", "--out-dir", "sw"],
     "dimap-fast: error: unknown model name 'swin_nope': see timm.list_models('swin*')"),
    ("sweep: a file name with a typo", ["sweep", "small.safetensor", "--ratios", "0.5", "--out-dir", "sw"],
     "dimap-fast: error: 'small.safetensor' is neither a checkpoint file nor a timm model name: check the path or the name"),
    ("sweep: one source missing", ["sweep", "small.safetensors", "missing.pth", "--ratios", "0.5", "--out-dir", "sw"],
     "dimap-fast: error: checkpoint missing.pth not found: check the path"),
    ("sweep: one source corrupt", ["sweep", "small.safetensors", "truncated.safetensors", "--ratios", "0.5", "--out-dir", "sw"],
     "dimap-fast: error: cannot read truncated.safetensors: not a valid safetensors file (Error while deserializing header: "
     "incomplete metadata, file not fully covered): it is truncated or damaged; copy or export it again"),
    ("sweep: another architecture", ["sweep", "small.safetensors", "--model", TINY, "--ratios", "0.5", "--out-dir", "sw"],
     "dimap-fast: error: small.safetensors does not fit this architecture: layers.0.blocks.0.attn.proj.weight has shape "
     "(16, 16), the model expects (96, 96); pass the right --model"),
    ("sweep: two sources, one output name", ["sweep", "small.safetensors", "small.pth", "--ratios", "0.5", "--out-dir", "sw"],
     "dimap-fast: error: small.safetensors and small.pth would write the same outputs (small__...): rename one of them"),
    ("sweep: bad ratio list", ["sweep", "small.safetensors", "--ratios", "0.2,2", "--out-dir", "sw"],
     "dimap-fast sweep: error: argument --ratios: ratio must be in [0, 1), got 2.0: it is the fraction of weights to remove "
     "(see dimap-fast sweep --help)"),
    ("sweep: unknown method", ["sweep", "small.safetensors", "--ratios", "0.5", "--methods", "dimap,lamp", "--out-dir", "sw"],
     "dimap-fast sweep: error: argument --methods: unknown method 'lamp': choose from dimap, global, uniform "
     "(see dimap-fast sweep --help)"),
    ("sweep: --out-dir is a file", ["sweep", "small.safetensors", "--ratios", "0.5", "--out-dir", "notes.txt"],
     "dimap-fast: error: --out-dir notes.txt is a file: name a folder"),
]


def snapshot(d):
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, d)] = None if os.path.isdir(p) else hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def error_lines(text):
    """stderr as a user's terminal shows it: a progress bar that erased itself (\\r) leaves nothing."""
    return [line.split("\r")[-1] for line in text.split("\n") if line.split("\r")[-1].strip()]


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    make_files(d)
    return d


def run_case(argv, bad_dir, capsys, monkeypatch):
    monkeypatch.chdir(bad_dir)
    if argv[0] == "prune" and "--out" not in argv:
        argv = argv + ["--out", "out.safetensors"]
    before = snapshot(bad_dir)
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert snapshot(bad_dir) == before, "a file was written, changed or left behind"
    assert not (bad_dir / "ran.txt").exists(), "pickled code ran"
    lines = error_lines(captured.err)
    assert len(lines) == 1, captured.err
    return lines[0]


def matches(line, expected):
    """Equal, where each "…" stands for words a library chose (they vary with its version)."""
    parts = expected.split("…")
    if len(parts) == 1:
        return line == expected
    if not (line.startswith(parts[0]) and line.endswith(parts[-1])):
        return False
    at = len(parts[0])
    for part in parts[1:-1]:
        at = line.find(part, at)
        if at < 0:
            return False
        at += len(part)
    return at <= len(line) - len(parts[-1])


@pytest.mark.parametrize("argv,expected", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_one_line_exit_2_nothing_written(argv, expected, bad_dir, capsys, monkeypatch):
    line = run_case(argv, bad_dir, capsys, monkeypatch)
    assert matches(line, expected), line


def test_refusals_leave_no_temporary_file_and_the_good_case_writes_one_file(bad_dir, capsys, monkeypatch):
    monkeypatch.chdir(bad_dir)
    before = snapshot(bad_dir)
    assert main(["prune", "small.safetensors", "--ratio", "0.5", "--out", "ok.safetensors"]) == 0
    after = snapshot(bad_dir)
    assert set(after) - set(before) == {"ok.safetensors"}
    assert all(after[k] == v for k, v in before.items())  # the input is unchanged, byte for byte
    (bad_dir / "ok.safetensors").unlink()


# ---- the Python API: the same refusals as DimapError --------------------------------------------------------------

def _state(**changes):
    state = make_state(SHAPES)
    state.update(changes)
    return state


LAYERS = ("*blocks.*.attn.proj.weight, *blocks.*.attn.qkv.weight, *blocks.*.mlp.fc1.weight, *blocks.*.mlp.fc2.weight")
NOT_A_MODEL = ": pass a timm model or the dict that model.state_dict() returns"
API_CASES = [
    ("ratio as text", lambda: dimap_fast.compute_masks(_state(), "0.5"), "ratio must be a number in [0, 1), got '0.5'"),
    ("ratio True", lambda: dimap_fast.compute_masks(_state(), True), "ratio must be a number in [0, 1), got True"),
    ("ratio 1", lambda: dimap_fast.plan(_state()).masks(1.0),
     "ratio must be in [0, 1), got 1.0: it is the fraction of weights to remove"),
    ("ratio inf", lambda: dimap_fast.plan(_state()).cutoffs(float("inf")),
     "ratio must be in [0, 1), got inf: it is the fraction of weights to remove"),
    ("unknown method", lambda: dimap_fast.plan(_state(), method="lamp"),
     "unknown method 'lamp': choose one of dimap, global, uniform"),
    ("unknown backend", lambda: dimap_fast.plan(_state(), backend="cuda"),
     "unknown backend 'cuda': choose one of auto, numpy, triton"),
    ("unknown pattern", lambda: dimap_fast.plan(_state(), pattern="diag"),
     "unknown pattern 'diag': choose one of unstructured, block, channel, 2:4"),
    ("bad block size", lambda: dimap_fast.plan(_state(), pattern="block", block_size=7),
     "block_size must be one of (16, 32, 64), got 7"),
    ("not a model", lambda: dimap_fast.compute_masks([1, 2], 0.5),
     "expected a torch.nn.Module or a state dict, got list" + NOT_A_MODEL),
    ("None", lambda: dimap_fast.plan(None), "expected a torch.nn.Module or a state dict, got NoneType" + NOT_A_MODEL),
    ("empty state dict", lambda: dimap_fast.plan({}),
     f"no prunable weight found (looked for {LAYERS}): this is not a timm Swin; "
     "pass module_map={'MODULE': ['glob', ...]} for other models"),
    ("bad module_map", lambda: dimap_fast.plan(_state(), module_map={"M": []}),
     "module_map['M'] must be one or more non-empty glob patterns"),
    ("overlapping module_map", lambda: dimap_fast.plan(_state(), module_map={"A": "*fc1*", "B": "*mlp*"}),
     f"{FC1} matches modules ['A', 'B']: make the module_map patterns disjoint"),
    ("NaN weights", lambda: dimap_fast.plan(_state(**{FC1: torch.full((4, 4), float("nan"))})),
     f"{FC1} holds NaN weights: repair or retrain the checkpoint before pruning"),
    ("Inf weights", lambda: dimap_fast.compute_masks(_state(**{FC1: torch.tensor([[1.0, float("inf")]])}), 0.5),
     f"{FC1} holds Inf weights: repair or retrain the checkpoint before pruning"),
    ("empty module", lambda: dimap_fast.plan(_state(**{FC1: torch.zeros(0)})),
     f"{FC1} is empty (shape (0,)): nothing to prune there"),
    ("integer weights", lambda: dimap_fast.plan(_state(**{FC1: torch.ones(3, dtype=torch.int64)})),
     f"{FC1} has dtype torch.int64: prunable weights must be floating point"),
    ("mixed dtypes", lambda: dimap_fast.plan(_state(**{FC1: torch.ones(3, dtype=torch.bfloat16)})),
     f"prunable weights mix dtypes: float32 (layers.0.blocks.0.attn.proj.weight), bfloat16 ({FC1}); "
     "cast them to one first, e.g. model.float() or {k: v.float() for k, v in state_dict.items()}"),
    ("meta weights", lambda: dimap_fast.plan(_state(**{FC1: torch.ones(3, device="meta")})),
     f"{FC1} is on the meta device and holds no values: load the weights first"),
    ("sparse weights", lambda: dimap_fast.plan(_state(**{FC1: torch.eye(3).to_sparse()})),
     f"{FC1} is a torch.sparse_coo tensor: make the weights dense first (tensor.to_dense())"),
    ("unknown device", lambda: dimap_fast.plan(_state(), device="gpu"), "unknown device 'gpu': use 'cpu', 'cuda' or 'cuda:N'"),
    ("report of a list", lambda: dimap_fast.report([1]), "expected a torch.nn.Module or a state dict, got list" + NOT_A_MODEL),
    ("masks for another model",
     lambda: dimap_fast.apply_masks(torch.nn.Linear(2, 2), {"fc.weight": torch.ones(2, 2, dtype=torch.bool)}),
     "mask 'fc.weight' names no parameter of this model: were the masks made for another model?"),
    ("mask of wrong shape", lambda: dimap_fast.apply_masks(torch.nn.Linear(2, 2), {"weight": torch.ones(3, dtype=torch.bool)}),
     "mask 'weight' must be a bool tensor of shape (2, 2), got (3,)"),
    ("load: not a path", lambda: load_state_dict(42), "a checkpoint is a file path, got int"),
    ("load: missing file", lambda: load_state_dict("no/such.safetensors"), "checkpoint no/such.safetensors not found: check the path"),
]


@pytest.mark.parametrize("call,message", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refusals_are_one_line_dimap_errors(call, message):
    with pytest.raises(DimapError) as info:
        call()
    assert str(info.value) == message


def test_mixed_devices_refused(device):
    """A state dict spread over the CPU and a GPU: on a GPU host a real CUDA tensor; on a CPU host
    a fake one (torch's FakeTensor carries a device and no storage), which is all the check reads."""
    if device.type == "cuda":
        other = torch.ones(4, 4, device=device)
    else:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            other = torch.ones(4, 4, device="cuda")
    state = _state(**{FC1: other})
    with pytest.raises(DimapError, match=r"several devices \(cpu, cuda(:0)?\)"):
        dimap_fast.plan(state)


def test_load_pruned_refuses_a_damaged_mask(tmp_path):
    state = make_state(SHAPES)
    path = tmp_path / "p.safetensors"
    save_pruned(path, state, {FC1: torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(DimapError, match=r"the mask of layers.0.blocks.0.mlp.fc1.weight is torch.bool \(3, 3\)"):
        load_pruned(path)


def test_dimap_error_is_always_one_line():
    assert str(DimapError("first line\n  second line\n")) == "first line second line"


def test_docs_list_every_case():
    """docs/bad_inputs.md shows every case above with the line it gets."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "bad_inputs.md").read_text()
    for label, _, expected in CLI_CASES:
        assert f"| {label} | " in doc and f"`{expected}`" in doc, label
    for label, _, message in API_CASES:
        assert f"| {label} | " in doc and f"`{message}`" in doc, label
