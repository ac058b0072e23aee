"""convert's per-layer choice of dense / kernel / BSR / 2:4: the table, its cache, the modules."""

import copy
import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dimap_fast.nn as dnn
from dimap_fast.errors import DimapError
from dimap_fast.nn import format_choice as choice
from dimap_fast.nn.format_choice import ChoiceTable, LayerKey
from test_modules import block_prune, small_swin

PRUNABLE = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


class FakeTimer:
    """A measure function with fixed seconds per candidate; counts the keys it measured."""

    def __init__(self, **seconds):
        self.seconds = {k.replace("_", ":"): v for k, v in seconds.items()}  # two_four -> 2:4
        self.keys = []

    def __call__(self, key, device):
        self.keys.append(key)
        return {c: self.seconds.get(c) for c in key.candidates}


def never(key, device):
    raise AssertionError(f"measured {key.text}, expected the cached entry")


def prunable(model):
    return [m for n, m in model.named_modules() if n.endswith(PRUNABLE)]


def test_fastest_needs_a_margin_over_dense():
    assert choice.fastest({"dense": 1.0, "bsr": 0.5, "kernel": 0.7}) == "bsr"
    assert choice.fastest({"dense": 1.0, "bsr": 0.97}) == "dense"  # within timing noise
    assert choice.fastest({"dense": 1.0, "bsr": None}) == "dense"  # dropped at the probe
    assert choice.fastest({"dense": 0.5, "bsr": 1.0}) == "dense"


@torch.no_grad()
def test_dense_wins_keeps_nn_linear_and_records_each_layer(tmp_path):
    model = block_prune(small_swin())
    timer = FakeTimer(dense=1.0, bsr=2.0)
    dnn.convert(model, table=ChoiceTable(tmp_path / "t.json", measure=timer))
    assert all(type(m) is nn.Linear for m in prunable(model))
    report = model.dimap_convert_report
    assert [r.name for r in report] == [n for n, _ in model.named_modules() if n.endswith(PRUNABLE)]
    assert all(r.chosen == "dense" and r.times == {"dense": 1.0, "bsr": 2.0} for r in report)
    assert all(r.rows and r.block == 16 and r.tile_density == pytest.approx(0.5, abs=0.05)
               for r in report)
    # rows per call: one 32x32 image -> 16x16 tokens in stage 0, 8x8 in stage 1, times batch 32
    rows = {r.name: r.rows for r in report}
    assert rows["layers.0.blocks.0.mlp.fc1"] == 256 * 32 and rows["layers.1.blocks.1.attn.qkv"] == 64 * 32
    assert len(timer.keys) == len({k.text for k in timer.keys}) < len(report)  # shared keys, once
    text = dnn.format_choices(model)
    assert "layers.1.blocks.1.mlp.fc2" in text and "chosen: 16 dense" in text


@torch.no_grad()
def test_bsr_wins_swaps_bsr_linears_with_the_same_outputs(tmp_path):
    model = block_prune(small_swin())
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    dnn.convert(model, table=ChoiceTable(tmp_path / "t.json", measure=FakeTimer(dense=2.0, bsr=1.0)))
    swapped = prunable(model)
    assert len(swapped) == 16 and all(type(m) is dnn.BsrLinear for m in swapped)
    assert {r.chosen for r in model.dimap_convert_report} == {"bsr"}
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    ref.load_state_dict(model.state_dict())  # a plain timm model loads the converted weights
    # converting again changes nothing and measures nothing
    dnn.convert(model, table=ChoiceTable(tmp_path / "t.json", measure=never))
    assert all(r.note == "converted before" and r.chosen == "bsr" for r in model.dimap_convert_report)


def test_cache_is_written_read_back_and_survives_corruption(tmp_path):
    path = tmp_path / "sub" / "t.json"
    timer = FakeTimer(dense=1.0, bsr=2.0)
    dnn.convert(block_prune(small_swin()), table=ChoiceTable(path, measure=timer))
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == len(timer.keys) > 0
    assert all(v == {"dense": 1.0, "bsr": 2.0} for v in entries.values())
    model = dnn.convert(block_prune(small_swin()), table=ChoiceTable(path, measure=never))
    assert all(r.note == "cached" for r in model.dimap_convert_report)
    assert list(path.parent.iterdir()) == [path]  # no temporary files left behind

    path.write_text('{"format": 1, "entries": {"x": [1')
    timer = FakeTimer(dense=2.0, bsr=1.0)
    with pytest.warns(UserWarning, match="unreadable timing cache"):
        model = dnn.convert(block_prune(small_swin()), table=ChoiceTable(path, measure=timer))
    assert timer.keys and {r.chosen for r in model.dimap_convert_report} == {"bsr"}
    assert len(json.loads(path.read_text())["entries"]) == len(timer.keys)


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DIMAP_FAST_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert choice.cache_dir() == tmp_path / "xdg" / "dimap_fast"
    monkeypatch.setenv("DIMAP_FAST_CACHE_DIR", str(tmp_path / "mine"))
    assert ChoiceTable().path == tmp_path / "mine" / choice.CACHE_NAME


def test_key_holds_device_torch_dtype_shape_block_and_density():
    w = torch.zeros(96, 32)
    key = LayerKey.for_layer(w, 3000, 16, 0.26, ("dense", "bsr"))
    assert key.rows == 2896 and key.density == 0.25  # half-power-of-two rows, 0.05 density steps
    assert choice.device_name("cpu") in key.text and torch.__version__ in key.text
    assert f"{torch.get_num_threads()}t" in choice.device_name("cpu")
    texts = {key.text,
             LayerKey.for_layer(w.double(), 3000, 16, 0.26, ("dense", "bsr")).text,
             LayerKey.for_layer(torch.zeros(96, 64), 3000, 16, 0.26, ("dense", "bsr")).text,
             LayerKey.for_layer(w, 6000, 16, 0.26, ("dense", "bsr")).text,
             LayerKey.for_layer(w, 3000, 32, 0.26, ("dense", "bsr")).text,
             LayerKey.for_layer(w, 3000, 16, 0.5, ("dense", "bsr")).text}
    assert len(texts) == 6
    assert LayerKey.for_layer(w, 10**6, 16, 0.5, ("dense",)).rows == choice.ROWS_CAP


@torch.no_grad()
def test_real_cpu_measurement_keeps_the_outputs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    for m in (model[0], model[2]):
        dnn.zero_smallest_tiles_(m.weight, 0.75, 16)
    x = torch.randn(16, 64)
    want = model(x)
    dnn.convert(model, 16, module_map={"MLP-M": ["*.weight"]}, example_input=x,
                table=ChoiceTable(tmp_path / "t.json"))
    report = model.dimap_convert_report
    assert [r.name for r in report] == ["0", "2"] and all(r.rows == 16 for r in report)
    for r in report:
        assert set(r.times) == {"dense", "bsr"} and r.times["dense"] > 0
        assert r.chosen == choice.fastest(r.times) and r.note == "measured"
        assert type(model.get_submodule(r.name)) is {"dense": nn.Linear, "bsr": dnn.BsrLinear}[r.chosen]
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_bsr_linear_module():
    torch.manual_seed(0)
    lin = nn.Linear(96, 64)
    dnn.zero_smallest_tiles_(lin.weight.data, 0.5, 32)
    bsr = dnn.BsrLinear.from_linear(lin, block=64)
    assert bsr.weight is lin.weight and bsr.blocksize == (32, 32)  # 96 columns take 32-wide blocks
    x = torch.randn(3, 5, 96)
    with torch.no_grad():
        torch.testing.assert_close(bsr(x), F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
        assert bsr.sparse_weight().layout == torch.sparse_bsr
        lin.weight.mul_(2)  # in place: the BSR copy is rebuilt
        torch.testing.assert_close(bsr(x), F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    # gradients: the dense path, exactly nn.Linear's
    xg = x.clone().requires_grad_()
    bsr(xg).sum().backward()
    xl = x.clone().requires_grad_()
    grad_w = lin.weight.grad.clone()
    lin.weight.grad = None
    lin(xl).sum().backward()
    assert torch.equal(xg.grad, xl.grad) and torch.equal(grad_w, lin.weight.grad)
    fresh = nn.Linear(96, 64)
    fresh.load_state_dict(bsr.state_dict())
    assert torch.equal(fresh.weight, lin.weight)


def test_forced_and_refused_choices(tmp_path):
    model = block_prune(small_swin())
    dnn.convert(model, choose="dense")
    assert all(type(m) is nn.Linear for m in prunable(model))
    assert all(r.note == "asked for dense" for r in model.dimap_convert_report)
    dnn.convert(model, choose="bsr")
    assert all(type(m) is dnn.BsrLinear for m in prunable(model))
    with pytest.raises(DimapError, match="unknown choose"):
        dnn.convert(small_swin(), choose="fastest")
    with pytest.raises(DimapError, match="bsr.*float16"):
        dnn.convert(block_prune(small_swin()).half(), choose="bsr")
    with pytest.raises(DimapError, match="2:4.*CUDA"):
        dnn.convert(block_prune(small_swin()), choose="2:4")
    with pytest.raises(DimapError, match="batch_size"):
        dnn.convert(small_swin(), batch_size=0)


def test_meta_and_dense_layers_are_not_measured(tmp_path):
    with torch.device("meta"):
        model = small_swin()
    dnn.convert(model, table=ChoiceTable(tmp_path / "t.json", measure=never))
    assert {r.note for r in model.dimap_convert_report} == {"meta: no values yet"}
    model = dnn.convert(small_swin(), table=ChoiceTable(tmp_path / "t.json", measure=never))
    assert {r.note for r in model.dimap_convert_report} == {"below min_sparsity"}
    assert not (tmp_path / "t.json").exists()


def test_measure_table_fills_and_saves(tmp_path):
    path = tmp_path / "t.json"
    timer = FakeTimer(dense=1.0, bsr=0.5)
    rows = dnn.measure_table([(25088, 384, 96), (1568, 768, 3072)], densities=(0.25, 0.5),
                             blocks=(32,), table=ChoiceTable(path, measure=timer))
    assert len(rows) == 4 and all(r["chosen"] == "bsr" and r["rows"] <= choice.ROWS_CAP for r in rows)
    again = dnn.measure_table([(25088, 384, 96)], densities=(0.25,), blocks=(32,),
                              table=ChoiceTable(path, measure=never))
    assert again[0]["cached"] and again[0]["times"] == {"dense": 1.0, "bsr": 0.5}


def test_agrees_catches_a_wrong_module_and_convert_then_keeps_dense(tmp_path, monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    dnn.zero_smallest_tiles_(lin.weight.data, 0.5, 16)
    assert choice.agrees(dnn.BsrLinear.from_linear(lin, block=16), lin)
    wrong = copy.deepcopy(lin)
    wrong.weight.data[0, :] += 1e-2
    assert not choice.agrees(wrong, lin)
    conv = importlib.import_module("dimap_fast.nn.convert")  # the module, not the function

    monkeypatch.setattr(conv, "agrees", lambda new, old: False)
    with pytest.warns(UserWarning, match="bsr disagrees with F.linear"):
        model = dnn.convert(block_prune(small_swin()),
                            table=ChoiceTable(tmp_path / "t.json", measure=FakeTimer(dense=2.0, bsr=1.0)))
    assert all(type(m) is nn.Linear for m in prunable(model))
    assert {r.note for r in model.dimap_convert_report} == {"bsr disagreed with F.linear"}


def test_kernel_is_no_candidate_where_the_static_model_says_it_loses():
    # Swin-B stage 1's MLP (K=128): dense is bound by its bytes, skipping tiles cannot win;
    # stage 3's (512 -> 2048) is bound by its FLOPs: three quarters of the tiles gone can.
    for n, k in ((512, 128), (128, 512)):
        assert not choice.kernel_can_win(n, k, 0.25, torch.float16)
    assert choice.kernel_can_win(2048, 512, 0.25, torch.float16)
    assert not choice.kernel_can_win(2048, 512, 1.0, torch.float16)  # nothing skipped
