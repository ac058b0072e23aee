"""Each ``dimap-fast`` command through ``main([...])``, in process, on a small Swin built from its config.

The checkpoint records its architecture (``model_config``), so every command can rebuild and run it;
bad input is one line on stderr, exit code 2, and no file written, for every command alike.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from dimap_fast.io.checkpoint import MASK_PREFIX, SHRUNK_FORMAT, load_pruned, load_state_dict
import dimap_fast
from dimap_fast import Pattern
from dimap_fast.cli import main
from dimap_fast.cli.main import build_parser
from dimap_fast.io.models import load_shrunk, load_source
from dimap_fast.shrink import block_sizes
from dimap_fast.io.demo_model import build_swin

CONFIG = dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4], num_classes=10)
FC2 = "layers.1.blocks.1.mlp.fc2.weight"
QKV = "layers.0.blocks.0.attn.qkv.weight"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    torch.manual_seed(0)
    model = build_swin(CONFIG).eval()
    path = tmp_path_factory.mktemp("ckpt") / "small.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"model_config": json.dumps(CONFIG)})
    return path


def _masked_model(path):
    src = load_source(str(path), need_model=True)
    return src.model.eval(), src.masks


def test_prune_shrink_writes_a_smaller_model_with_the_masked_logits(small, tmp_path, capsys):
    masked_out, shrunk_out = tmp_path / "masked.safetensors", tmp_path / "shrunk.safetensors"
    common = [str(small), "--pattern", "channel", "--ratio", "0.5"]
    assert main(["prune", *common, "--out", str(masked_out)]) == 0
    assert main(["prune", *common, "--shrink", "--out", str(shrunk_out)]) == 0
    out = capsys.readouterr().out
    assert "4 blocks; heads" in out and f"wrote {shrunk_out}" in out
    assert load_state_dict(shrunk_out)[1]["format"] == SHRUNK_FORMAT
    masked, masks = _masked_model(masked_out)
    shrunk = load_shrunk(shrunk_out)
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in masked.parameters())
    assert any(v["hidden"] < 128 for v in block_sizes(shrunk).values())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (shrunk(x) - masked(x)).abs().max() < 1e-4
    assert main(["report", str(shrunk_out)]) == 0
    assert "shrunk from params" in capsys.readouterr().out


def test_prune_block_pattern_zeroes_whole_tiles(small, tmp_path, capsys):
    out = tmp_path / "block.safetensors"
    assert main(["prune", str(small), "--pattern", "block", "--block-size", "16", "--ratio", "0.5", "--out", str(out)]) == 0
    state, masks, meta = load_pruned(out)
    assert meta["pattern"] == "block" and meta["block_size"] == "16"
    for name, mask in masks.items():
        tiles = mask.reshape(mask.shape[0] // 16, 16, mask.shape[1] // 16, 16).permute(0, 2, 1, 3).flatten(2)
        assert (tiles.all(-1) | ~tiles.any(-1)).all(), name  # each 16x16 tile is all kept or all removed
        assert (state[name][~mask] == 0).all(), name
    assert {QKV, FC2} <= set(masks)
    removed = sum((~m).sum().item() for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert abs(removed - 0.5) < 0.1


@pytest.mark.parametrize("argv,expected", [
    (["--pattern", "block16"], Pattern.block(16)),
    (["--pattern", "block", "--block-size", "16"], Pattern.block(16)),  # the README's spelling
    (["--pattern", "block"], Pattern.block(32)),
    (["--pattern", "block64", "--block-size", "64"], Pattern.block(64)),
    (["--pattern", "2:4"], Pattern.nm(2, 4)),
    ([], Pattern.unstructured()),
])
def test_pattern_flags_become_one_value(argv, expected):
    for command in (["prune", "m", "--ratio", "0.5", "--out", "o.safetensors"], ["sweep", "m", "--ratios", "0.5", "--out-dir", "d"]):
        args = build_parser().parse_args(command + argv)
        assert args.pattern == expected and isinstance(args.pattern, Pattern) and not hasattr(args, "block_size")
    args = build_parser().parse_args(["finetune", "--out", "r"])
    assert args.pattern is None  # finetune: no pattern unless pruning is asked for


def test_sweep_names_and_records_the_block_size(small, tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(["sweep", str(small), "--ratios", "0.5", "--pattern", "block16", "--out-dir", str(out)]) == 0
    (written,) = out.glob("*.safetensors")
    assert written.name == "small__dimap__block16__r0.5.pruned.safetensors"
    _, masks, meta = load_pruned(written)
    assert meta["pattern"] == "block" and meta["block_size"] == "16"
    expected = dimap_fast.compute_masks(load_state_dict(small)[0], 0.5, pattern=Pattern.block(16))
    assert masks.keys() == expected.keys() and all(torch.equal(masks[k], v) for k, v in expected.items())
    stamp = written.stat().st_mtime_ns
    assert main(["sweep", str(small), "--ratios", "0.5", "--pattern", "block", "--block-size", "16", "--out-dir", str(out)]) == 0
    assert written.stat().st_mtime_ns == stamp  # the same choice, spelled the README's way: kept


def test_prune_channel_pattern_removes_whole_neurons(small, tmp_path, capsys):
    out = tmp_path / "channel.safetensors"
    assert main(["prune", str(small), "--pattern", "channel", "--ratio", "0.5", "--out", str(out)]) == 0
    _, masks, meta = load_pruned(out)
    assert meta["pattern"] == "channel"
    fc2 = masks[FC2]  # a neuron is a column of fc2: kept or removed whole
    assert (fc2.all(0) | ~fc2.any(0)).all() and (~fc2.any(0)).any()
    fc1 = masks[FC2.replace("fc2", "fc1")]
    assert torch.equal(fc1.all(1), fc2.all(0))  # and its fc1 row with it


def test_report_layers_lists_every_prunable_layer(small, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    assert main(["prune", str(small), "--ratio", "0.5", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["report", str(out), "--layers"]) == 0
    text = capsys.readouterr().out
    for name in load_pruned(out)[1]:
        assert name in text
    assert "FLOPs   dense" in text  # the architecture is recorded, so FLOPs are counted


def test_report_throughput_times_dense_against_this_model(small, tmp_path, capsys):
    assert main(["report", str(small), "--throughput", "--batch", "2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    t = rep["throughput"]
    assert t["batch"] == 2 and t["dense"] > 0 and t["model"] > 0
    assert t["speedup"] == pytest.approx(t["model"] / t["dense"])
    # on the CPU the drop-ins' pair too, as the model would be deployed
    assert t["dense_converted"] > 0 and t["speedup_converted"] == pytest.approx(t["model_converted"] / t["dense_converted"])


def test_bench_prints_a_cpu_table(tmp_path, capsys):
    assert main(["bench", "--shapes", "48x80", "--sparsities", "0,0.5", "--block", "16", "--batch-tokens", "32",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "CPU code path" in out and out.count("48x80") == 2


def test_bench_saves_converts_choice_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIMAP_FAST_CACHE_DIR", str(tmp_path))
    argv = ["bench", "--save-choices", "--shapes", "64x96", "--sparsities", "0.5,0.9", "--block", "32",
            "--batch-tokens", "64", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "linear_choices.json").read_text())
    assert len(saved["entries"]) == 2, saved
    assert out.count("96 x 64") == 2 and "(cached)" not in out
    assert main(argv) == 0  # a second run finds every entry in the file: nothing is timed again
    assert capsys.readouterr().out.count("(cached)") == 2


def test_demo_runs_on_the_shipped_model(tmp_path, capsys):
    assert main(["demo", "--out-dir", str(tmp_path), "--ratios", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "dense accuracy" in out and "dimap at 50%" in out
    (written,) = tmp_path.iterdir()
    _, masks, meta = load_pruned(written)
    assert meta["method"] == "dimap" and masks


def _bad_commands(d, small):
    out = str(d / "out.safetensors")
    return {
        "shrink without channel": ["prune", str(small), "--ratio", "0.5", "--shrink", "--out", out],
        "shrink, no architecture": ["prune", str(d / "bare.safetensors"), "--pattern", "channel", "--ratio", "0.5",
                                    "--shrink", "--out", out],
        "block size not offered": ["prune", str(small), "--pattern", "block", "--block-size", "24", "--ratio", "0.5",
                                   "--out", out],
        "unknown pattern": ["prune", str(small), "--pattern", "rows", "--ratio", "0.5", "--out", out],
        "block size with channel": ["prune", str(small), "--pattern", "channel", "--block-size", "16", "--ratio", "0.5",
                                    "--out", out],
        "block size without pattern": ["prune", str(small), "--block-size", "16", "--ratio", "0.5", "--out", out],
        "block size twice": ["prune", str(small), "--pattern", "block32", "--block-size", "16", "--ratio", "0.5",
                             "--out", out],
        "sweep block size with 2:4": ["sweep", str(small), "--ratios", "0.5", "--pattern", "2:4", "--block-size", "16",
                                      "--out-dir", str(d / "sw")],
        "finetune block size alone": ["finetune", "--data", "digits", "--ratio", "0.5", "--block-size", "16",
                                      "--out", str(d / "run")],
        "report batch 0": ["report", str(small), "--throughput", "--batch", "0"],
        "report, throughput without architecture": ["report", str(d / "bare.safetensors"), "--throughput"],
        "sweep empty ratios": ["sweep", str(small), "--ratios", ",", "--out-dir", str(d / "sw")],
        "bench shape": ["bench", "--shapes", "48by80"],
        "bench sparsity": ["bench", "--sparsities", "2"],
        "bench tokens": ["bench", "--batch-tokens", "0"],
        "demo ratio": ["demo", "--out-dir", str(d / "demo"), "--ratios", "1.5"],
        "finetune epochs": ["finetune", "--data", "digits", "--out", str(d / "run"), "--epochs", "two"],
        "eval unknown flag": ["eval", str(small), "--no-such-flag"],
        "unknown command": ["compress", str(small)],
    } | ({} if torch.cuda.is_available() else
         {"bench on a missing GPU": ["bench", "--device", "cuda", "--shapes", "16x16", "--plot", str(d / "b.png")]})


def test_every_command_refuses_bad_input_in_one_line_with_exit_2(small, tmp_path, capsys):
    bare = tmp_path / "bare.safetensors"  # weights only: no architecture recorded
    save_file({k: v for k, v in load_state_dict(small)[0].items()}, str(bare))
    before = sorted(p.name for p in tmp_path.iterdir())
    for label, args in _bad_commands(tmp_path, small).items():
        code = main(args)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, label
        assert len(lines) == 1 and "error: " in lines[0], (label, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, label
    assert not any(k.startswith(MASK_PREFIX) for k in load_state_dict(bare)[0])
