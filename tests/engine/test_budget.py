"""Pruning to a FLOPs budget: the ratio ratio_for_flops picks, checked against report() on the pruned model.

For unstructured and block the pruned model is the masked one; for channel it is the model shrink()
builds from it, whose FLOPs are compared with the dense model's. The ratio must be the smallest that
reaches the target: the float just below it must not.
"""

import copy
import csv
import json
import math

import pytest
import timm
import torch
from safetensors.torch import save_file
from statedicts import make_state
from test_trust_inputs import error_lines, matches, snapshot

import dimap_fast
from dimap_fast import DimapError
from dimap_fast.engine.budget import LAST_RATIO
from dimap_fast.cli import main
from dimap_fast.engine.flops import count_workload
from dimap_fast.io.checkpoint import load_pruned
from dimap_fast.shrink import shrink

CONFIG = dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10)
PATTERNS = ["unstructured", "block16", "channel"]  # names Pattern.parse reads


def small_swin(seed=0, holes=False):
    """The small Swin of test_shrink; with ``holes``, weights that are zero already, a dead head and dead neurons."""
    torch.manual_seed(seed)
    model = timm.models.swin_transformer.SwinTransformer(**CONFIG).eval()
    if holes:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".weight") and p.dim() == 2:
                    p.mul_(torch.rand_like(p) > 0.3)
            model.layers[1].blocks[0].attn.proj.weight[:, :16] = 0  # head 0 of 4 gives nothing
            model.layers[0].blocks[1].mlp.fc2.weight[:, 5:40] = 0  # 35 neurons give nothing
    return model


def measured(model, pattern, ratio, method="dimap"):
    """The FLOPs reduction report() gives for ``model`` pruned at ``ratio`` (channel: shrunk)."""
    pruned = copy.deepcopy(model)
    dimap_fast.plan(pruned, method=method, pattern=pattern).prune_(ratio)
    if pattern == "channel":
        return 1 - dimap_fast.report(shrink(pruned))["flops"]["dense"] / dimap_fast.report(model)["flops"]["dense"]
    return dimap_fast.report(pruned)["flops"]["reduction"]


@pytest.mark.parametrize("holes", [False, True], ids=["dense", "with-zeros"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_chosen_ratio_is_the_smallest_that_reaches_the_target(pattern, holes):
    model = small_swin(1, holes)
    p = dimap_fast.plan(model, pattern=pattern)
    for target in (0.35, 0.5):
        ratio = p.ratio_for_flops(target)
        got = measured(model, pattern, ratio)
        assert got >= target
        assert got == p.flops_reduction(ratio)  # the same count, to the last bit
        below = math.nextafter(ratio, 0.0)
        assert measured(model, pattern, below) < target  # so nothing between target and got is reachable
        assert p.flops_reduction(ratio - 1e-9) < target
        if pattern != "channel":  # a head or 8 neurons of this small model weigh more than 1%
            assert got - target < 0.01


@pytest.mark.parametrize("method", ["global", "uniform"])
def test_other_methods(method):
    model = small_swin(2)
    p = dimap_fast.plan(model, method=method)
    ratio = p.ratio_for_flops(0.4)
    assert 0.4 <= measured(model, "unstructured", ratio, method) < 0.41
    assert measured(model, "unstructured", math.nextafter(ratio, 0.0), method) < 0.4


@pytest.mark.parametrize("pattern", PATTERNS)
def test_flops_reduction_equals_report_and_never_falls(pattern):
    model = small_swin(3, holes=True)
    p = dimap_fast.plan(model, pattern=pattern)
    ratios = [0.0, 0.1, 0.3, 0.6, 0.9]
    for r in ratios[1::2]:
        assert p.flops_reduction(r) == measured(model, pattern, r)
    grid = [p.flops_reduction(r) for r in [i / 200 for i in range(200)] + [LAST_RATIO]]
    assert grid == sorted(grid)
    assert p.ratio_for_flops(0.0) == 0.0


def test_swin_tiny_unstructured_and_channel(swin_tiny_state):
    model = timm.create_model("swin_tiny_patch4_window7_224").eval()
    model.load_state_dict(swin_tiny_state)
    for pattern, target in (("unstructured", 0.5), ("channel", 0.3)):
        p = dimap_fast.plan(model, pattern=pattern)
        ratio = p.ratio_for_flops(target)
        got = measured(model, pattern, ratio)
        assert target <= got < target + 0.01
        assert p.flops_reduction(math.nextafter(ratio, 0.0)) < target


def test_meta_pass_sees_what_a_real_pass_sees():
    model = small_swin(4)
    assert count_workload(model, (1, 3, 32, 32), meta=True) == count_workload(model, (1, 3, 32, 32), meta=False)


def test_unreachable_reduction_names_the_maximum():
    model = small_swin(5)
    for pattern in PATTERNS:
        p = dimap_fast.plan(model, pattern=pattern)
        best = p.flops_reduction(LAST_RATIO)
        shown = math.floor(best * 1e4) / 1e4
        with pytest.raises(DimapError, match=f"removes at most {shown:.4f} of the FLOPs") as info:
            p.ratio_for_flops(0.95)
        assert f"ask for {shown:.4f} or less" in str(info.value)
        assert p.ratio_for_flops(shown) < 1.0  # what the message offers is reachable


def _state():
    return small_swin(6).state_dict()


API_CASES = [
    ("reduction 1", lambda: dimap_fast.plan(small_swin()).ratio_for_flops(1.0),
     "a FLOPs reduction must be in [0, 1), got 1.0: it is the fraction of the dense FLOPs to remove"),
    ("negative reduction", lambda: dimap_fast.plan(small_swin()).ratio_for_flops(-0.1),
     "a FLOPs reduction must be in [0, 1), got -0.1: it is the fraction of the dense FLOPs to remove"),
    ("reduction nan", lambda: dimap_fast.plan(small_swin()).ratio_for_flops(float("nan")),
     "a FLOPs reduction must be in [0, 1), got nan: it is the fraction of the dense FLOPs to remove"),
    ("reduction as text", lambda: dimap_fast.plan(small_swin()).ratio_for_flops("0.5"),
     "a FLOPs reduction must be a number in [0, 1), got '0.5'"),
    ("unreachable reduction", lambda: dimap_fast.plan(small_swin()).ratio_for_flops(0.95),
     "a FLOPs reduction of 0.95 is out of reach: pattern 'unstructured' removes at most 0.8992 of the FLOPs (layers "
     "outside the prunable modules and the attention matmuls are never pruned); ask for 0.8992 or less"),
    ("unreachable with channels", lambda: dimap_fast.plan(small_swin(), pattern="channel").ratio_for_flops(0.9),
     "a FLOPs reduction of 0.9 is out of reach: pattern 'channel' removes at most 0.7915 of the FLOPs (every block keeps "
     "one head and one MLP neuron, rounded up to 8, and layers outside the blocks are never pruned); ask for 0.7915 or less"),
    ("plan of a state dict", lambda: dimap_fast.plan(_state()).ratio_for_flops(0.5),
     "this plan was made from a state dict, which cannot be run to count FLOPs: plan the model itself, "
     "dimap_fast.plan(model), to prune to a FLOPs reduction"),
    ("2:4", lambda: dimap_fast.plan(small_swin(), pattern="2:4").ratio_for_flops(0.3),
     "pattern '2:4' removes half of every prunable weight, a fixed share of the FLOPs: prune it at ratio 0.5 instead "
     "of asking for a FLOPs reduction"),
    ("weights changed after planning", lambda: _changed_after_planning().ratio_for_flops(0.5),
     "the prunable weights changed after planning (prune_, an optimizer step): plan the model again before asking for FLOPs"),
]


def _changed_after_planning():
    p = dimap_fast.plan(small_swin(), pattern="block", block_size=16)
    p.prune_(0.3)  # block and channel read the weights at the first FLOPs question: these are not the planned ones
    return p


HF_CONFIG = dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=10)


def _family(kind):
    """A small model of each family the channel budget knows besides timm's v1 (HF as in test_hf_swin)."""
    torch.manual_seed(0)
    if kind == "timm-swinv2":
        model = timm.models.swin_transformer_v2.SwinTransformerV2(**CONFIG).eval()
        with torch.no_grad():
            model.layers[1].blocks[0].attn.proj.weight[:, :16] = 0  # a dead head: shrink drops it at any ratio
        return model
    transformers = pytest.importorskip("transformers")
    if kind == "hf-swin":
        return transformers.SwinForImageClassification(transformers.SwinConfig(**HF_CONFIG)).eval()
    return transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**HF_CONFIG)).eval()


@pytest.mark.parametrize("kind", ["timm-swinv2", "hf-swin", "hf-swinv2"])
def test_channel_budget_of_other_families(kind):
    # v2's heads also own rows of the position-bias MLP's last Linear: shrink removes them, the count must too
    model = _family(kind)
    p = dimap_fast.plan(model, pattern="channel")
    for r in (0.2, 0.6):
        assert p.flops_reduction(r) == measured(model, "channel", r)
    ratio = p.ratio_for_flops(0.3)
    got = measured(model, "channel", ratio)
    assert got >= 0.3 and got == p.flops_reduction(ratio)
    assert measured(model, "channel", math.nextafter(ratio, 0.0)) < 0.3


def test_channel_budget_refuses_what_shrink_cannot_build():
    model = timm.models.swin_transformer_v2_cr.SwinTransformerV2Cr(
        img_size=(32, 32), patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10)
    p = dimap_fast.plan(model.eval(), pattern="channel")
    with pytest.raises(DimapError, match=r"^stages\.0\.blocks\.0\.attn: shrink supports timm's SwinTransformerV2 attention"):
        p.ratio_for_flops(0.3)


@pytest.mark.parametrize("call,message", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_budget_refusals(call, message):
    with pytest.raises(DimapError) as info:
        call()
    assert str(info.value) == message


def test_flops_of_a_budget_survive_prune():
    model = small_swin(7)
    p = dimap_fast.plan(model, pattern="block", block_size=16)
    ratio = p.ratio_for_flops(0.4)
    p.prune_(ratio)  # read once, before: later questions still see the planned weights
    assert p.ratio_for_flops(0.4) == ratio
    assert dimap_fast.report(model)["flops"]["reduction"] == p.flops_reduction(ratio)


# ---- the command line ---------------------------------------------------------------------------------------------

SHAPES = {
    "layers.0.blocks.0.attn.qkv.weight": (48, 16), "layers.0.blocks.0.attn.proj.weight": (16, 16),
    "layers.0.blocks.0.mlp.fc1.weight": (64, 16), "layers.0.blocks.0.mlp.fc2.weight": (16, 64),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """small_arch.safetensors names its architecture (model_config, as finetune writes it); small.safetensors does not."""
    d = tmp_path_factory.mktemp("budget")
    state = {k: v.contiguous() for k, v in small_swin(8).state_dict().items() if not k.endswith("relative_position_index")}
    save_file(state, str(d / "small_arch.safetensors"), metadata={"model_config": json.dumps(CONFIG)})
    save_file(make_state(SHAPES), str(d / "small.safetensors"))
    return d


def test_cli_prune_to_a_flops_reduction(files, tmp_path, capsys):
    out = tmp_path / "b.safetensors"
    assert main(["prune", str(files / "small_arch.safetensors"), "--flops-reduction", "0.4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    _, masks, meta = load_pruned(out)
    ratio = float(meta["ratio"])
    assert meta["flops_reduction_target"] == "0.4" and float(meta["flops_reduction"]) >= 0.4
    assert f"ratio {ratio!r} removes {float(meta['flops_reduction']):.2%} of the FLOPs (asked for 40.00%)" in printed
    model = small_swin(8)  # the checkpoint's weights
    assert measured(model, "unstructured", ratio) == float(meta["flops_reduction"])
    expected = dimap_fast.plan(model).masks(ratio)
    assert masks.keys() == expected.keys() and all(torch.equal(masks[k], v) for k, v in expected.items())


def test_cli_prune_channel_shrink_to_a_flops_reduction(files, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    args = ["prune", str(files / "small_arch.safetensors"), "--flops-reduction", "0.3", "--pattern", "channel", "--shrink",
            "--out", str(out)]
    assert main(args) == 0
    assert "of the FLOPs (asked for 30.00%)" in capsys.readouterr().out
    small = dimap_fast.load_shrunk(out)
    dense = dimap_fast.report(small_swin(8))["flops"]["dense"]
    assert 1 - dimap_fast.report(small)["flops"]["dense"] / dense >= 0.3


def test_cli_sweep_flops_reductions(files, tmp_path, capsys):
    out = tmp_path / "sw"
    args = ["sweep", str(files / "small_arch.safetensors"), "--flops-reductions", "0.3,0.5", "--methods", "dimap,uniform",
            "--out-dir", str(out)]
    assert main(args) == 0
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert names == [f"small_arch__{m}__flops{t}.pruned.safetensors" for m in ("dimap", "uniform") for t in ("0.3", "0.5")]
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["method"], r["flops_target"]) for r in rows] == [("dimap", "0.3"), ("dimap", "0.5"), ("uniform", "0.3"), ("uniform", "0.5")]
    for row in rows:
        _, _, meta = load_pruned(row["output"])
        assert float(row["ratio"]) == float(meta["ratio"]) and meta["flops_reduction_target"] == row["flops_target"]
        assert float(row["flops_reduction"]) >= float(row["flops_target"])
    printed = capsys.readouterr().out
    assert "target" in printed and "30.0%" in printed
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    assert main(args) == 0  # a rerun keeps what exists, and its rows
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == stamp
    again = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["ratio"], r["flops_reduction"], r["MLP-M"]) for r in again] == [(r["ratio"], r["flops_reduction"], r["MLP-M"]) for r in rows]


# (id, argv, the one line on stderr); prune cases get "--out out.safetensors" unless they name --out
ARCH = "small_arch.safetensors"
CLI_CASES = [
    ("FLOPs reduction above 1", ["prune", ARCH, "--flops-reduction", "1.5"],
     "dimap-fast prune: error: argument --flops-reduction: a FLOPs reduction must be in [0, 1), got 1.5: it is the fraction "
     "of the dense FLOPs to remove (see dimap-fast prune --help)"),
    ("FLOPs reduction not a number", ["prune", ARCH, "--flops-reduction", "half"],
     "dimap-fast prune: error: argument --flops-reduction: a FLOPs reduction must be a number in [0, 1), got 'half' "
     "(see dimap-fast prune --help)"),
    ("ratio and FLOPs reduction", ["prune", ARCH, "--ratio", "0.5", "--flops-reduction", "0.5"],
     "dimap-fast prune: error: argument --flops-reduction: not allowed with argument --ratio (see dimap-fast prune --help)"),
    ("neither ratio nor FLOPs reduction", ["prune", ARCH],
     "dimap-fast prune: error: one of the arguments --ratio --flops-reduction is required (see dimap-fast prune --help)"),
    ("FLOPs reduction out of reach", ["prune", ARCH, "--flops-reduction", "0.95"],
     "dimap-fast: error: a FLOPs reduction of 0.95 is out of reach: pattern 'unstructured' removes at most 0.8992 of the "
     "FLOPs (layers outside the prunable modules and the attention matmuls are never pruned); ask for 0.8992 or less"),
    ("FLOPs reduction out of reach, shrunk", ["prune", ARCH, "--flops-reduction", "0.9", "--pattern", "channel", "--shrink"],
     "dimap-fast: error: a FLOPs reduction of 0.9 is out of reach: pattern 'channel' removes at most 0.7915 of the FLOPs "
     "(every block keeps one head and one MLP neuron, rounded up to 8, and layers outside the blocks are never pruned); "
     "ask for 0.7915 or less"),
    ("FLOPs reduction of a checkpoint without architecture", ["prune", "small.safetensors", "--flops-reduction", "0.3"],
     "dimap-fast: error: --flops-reduction counts FLOPs by running the architecture, and small.safetensors names none: "
     "pass --model NAME"),
    ("FLOPs reduction with 2:4", ["prune", ARCH, "--flops-reduction", "0.3", "--pattern", "2:4"],
     "dimap-fast: error: pattern '2:4' removes half of every prunable weight, a fixed share of the FLOPs: prune it at "
     "ratio 0.5 instead of asking for a FLOPs reduction"),
    ("sweep: bad FLOPs reduction list", ["sweep", ARCH, "--flops-reductions", "0.3,1.2", "--out-dir", "sw"],
     "dimap-fast sweep: error: argument --flops-reductions: a FLOPs reduction must be in [0, 1), got 1.2: it is the "
     "fraction of the dense FLOPs to remove (see dimap-fast sweep --help)"),
    ("sweep: ratios and FLOPs reductions", ["sweep", ARCH, "--ratios", "0.5", "--flops-reductions", "0.5", "--out-dir", "sw"],
     "dimap-fast sweep: error: argument --flops-reductions: not allowed with argument --ratios (see dimap-fast sweep --help)"),
    ("sweep: checkpoint without architecture", ["sweep", "small.safetensors", "--flops-reductions", "0.3", "--out-dir", "sw"],
     "dimap-fast: error: --flops-reductions count FLOPs by running the architecture, and small.safetensors names none: "
     "pass --model NAME"),
    ("sweep: FLOPs reduction out of reach", ["sweep", ARCH, "--flops-reductions", "0.3,0.95", "--out-dir", "sw"],
     "dimap-fast: error: a FLOPs reduction of 0.95 is out of reach: pattern 'unstructured' removes at most 0.8992 of the "
     "FLOPs (layers outside the prunable modules and the attention matmuls are never pruned); ask for 0.8992 or less"),
]


@pytest.mark.parametrize("argv,expected", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_budget_refusals(argv, expected, files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    if argv[0] == "prune" and "--out" not in argv:
        argv = argv + ["--out", "out.safetensors"]
    before = snapshot(files)
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert snapshot(files) == before, "a file was written, changed or left behind"
    lines = error_lines(captured.err)
    assert len(lines) == 1, captured.err
    assert matches(lines[0], expected), lines[0]


def test_docs_list_every_budget_case():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "bad_inputs.md").read_text()
    for label, _, expected in CLI_CASES + API_CASES:
        assert f"| {label} | " in doc and f"`{expected}`" in doc, label
