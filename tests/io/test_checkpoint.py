"""The checkpoint module and the model loader: shrunk format, the one architecture check, no cycle."""

import json
from pathlib import Path

import pytest
import timm
import torch

import dimap_fast
from dimap_fast import DimapError
from dimap_fast.io.checkpoint import SHRUNK_FORMAT, load_state_dict, save_atomic, save_pruned
from dimap_fast.io.models import check_architecture, load_into, load_shrunk, load_source, read_shrunk, save_shrunk
from dimap_fast.shrink import block_sizes, shrink

PACKAGE = Path(dimap_fast.__file__).parent
TINY = "swin_tiny_patch4_window7_224"


def test_save_shrunk_with_arch_round_trips_with_equal_logits(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(TINY).eval()
    with torch.no_grad():  # what a channel pruning leaves (cheaper than scoring Swin-T): dead heads and neurons
        for block in (m for m in model.modules() if hasattr(m, "attn") and hasattr(m, "mlp")):
            hd = block.attn.proj.in_features // block.attn.num_heads
            block.attn.proj.weight[:, :hd] = 0  # the first head
            block.mlp.fc2.weight[:, ::3] = 0  # a third of the neurons
    x = torch.randn(1, 3, 224, 224)
    small = shrink(model)
    path = save_shrunk(small, tmp_path / "tiny_shrunk.safetensors", arch=TINY)
    loaded = load_shrunk(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert block_sizes(loaded) == block_sizes(small)
    dense = block_sizes(timm.create_model(TINY))
    assert all(v["heads"] == dense[k]["heads"] - 1 and v["hidden"] < dense[k]["hidden"] for k, v in block_sizes(loaded).items())
    _, meta = load_state_dict(path)
    assert meta["format"] == SHRUNK_FORMAT and meta["timm_model"] == TINY
    # a timm model names its architecture itself: arch= may be left out
    again = save_shrunk(small, tmp_path / "inferred.safetensors")
    assert load_state_dict(again)[1]["timm_model"] == TINY
    assert dimap_fast.load_shrunk is load_shrunk and dimap_fast.save_shrunk is save_shrunk


def test_load_shrunk_refuses_other_files_in_one_line(tmp_path):
    pruned = save_pruned(tmp_path / "pruned.safetensors", {"w": torch.ones(2, 2)}, {"w": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(DimapError, match="is not a shrunk model written by dimap-fast"):
        load_shrunk(pruned)
    damaged = save_atomic(tmp_path / "damaged.safetensors", {"w": torch.ones(2)},
                          {"format": SHRUNK_FORMAT, "block_sizes": "{not json", "timm_model": TINY})
    with pytest.raises(DimapError, match="block sizes are unreadable") as info:
        read_shrunk(damaged)
    assert "\n" not in str(info.value)
    nameless = save_atomic(tmp_path / "nameless.safetensors", {"w": torch.ones(2)},
                           {"format": SHRUNK_FORMAT, "block_sizes": "{}"})
    with pytest.raises(DimapError, match="names no architecture"):
        load_shrunk(nameless)


def test_one_architecture_check_for_models_and_headers(tmp_path, swin_tiny_state):
    state = dict(swin_tiny_state)
    state["head.fc.weight"] = torch.zeros(7, 768)
    want = "does not fit this architecture: head.fc.weight has shape (7, 768), the model expects (1000, 768)"
    with pytest.raises(DimapError, match=want.replace("(", r"\(").replace(")", r"\)")):
        check_architecture({k: tuple(v.shape) for k, v in state.items()}, TINY, "x.safetensors")
    model = timm.create_model(TINY)
    with pytest.raises(DimapError, match=r"head\.fc\.weight has shape \(7, 768\)"):
        load_into(model, state, "x.safetensors")
    state = {k: v for k, v in swin_tiny_state.items() if not k.startswith("head")}
    with pytest.raises(DimapError, match=r"\(missing \['head\.fc\.weight'"):
        check_architecture({k: tuple(v.shape) for k, v in state.items()}, TINY, "x.safetensors")
    with pytest.raises(DimapError, match=r"\(missing \['head\.fc\.weight'"):
        load_into(model, state, "x.safetensors")


def test_the_shipped_demo_checkpoint_loads_as_a_model():
    asset = PACKAGE / "assets" / "digits_swin.safetensors"
    src = load_source(str(asset), need_model=True)
    assert src.model is not None and src.model.num_classes == 10  # its architecture is in its "config"


def test_the_shrunk_format_has_one_home():
    homes = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if "dimap-fast/shrunk-1" in p.read_text()]
    assert homes == ["io/checkpoint.py"]


@pytest.mark.parametrize("kind", ["hf-swin", "hf-swinv2"])
def test_save_shrunk_rebuilds_a_hugging_face_swin_from_the_file_alone(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    small = dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=10)
    torch.manual_seed(0)
    if kind == "hf-swin":
        model = transformers.SwinForImageClassification(transformers.SwinConfig(**small)).eval()
    else:
        model = transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**small)).eval()
    dimap_fast.plan(model, pattern="channel").prune_(0.6)
    small_model = shrink(model)
    path = save_shrunk(small_model, tmp_path / "hf_shrunk.safetensors")  # no arch=: the adapter records it
    meta = load_state_dict(path)[1]
    assert meta["adapter"] == kind and "timm_model" not in meta
    assert json.loads(meta["model_config"])["model_class"] == type(model).__name__
    torch.manual_seed(1)  # the rebuilt model starts from other random weights: only the file's count
    loaded = load_shrunk(path)
    assert type(loaded) is type(model) and not loaded.training
    assert block_sizes(loaded) == block_sizes(small_model) != block_sizes(type(model)(model.config))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, small_model(x).logits)


def test_load_shrunk_refuses_a_class_it_cannot_rebuild_in_one_line(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2], num_heads=[2], window_size=4)
    model = transformers.SwinForImageClassification(config)
    path = save_shrunk(model, tmp_path / "hf.safetensors")
    _, meta = load_state_dict(path)
    recorded = json.loads(meta["model_config"])
    for name in ("os.system", "BertModel", None):
        meta.update(model_config=json.dumps({**recorded, "model_class": name}))
        bad = save_atomic(tmp_path / "bad.safetensors", load_state_dict(path)[0], meta)
        with pytest.raises(DimapError, match=f"cannot rebuild model class {name!r} as hf-swin") as info:
            load_shrunk(bad)
        assert "\n" not in str(info.value)
    meta.update(model_config=json.dumps(recorded), adapter="keras-swin")
    bad = save_atomic(tmp_path / "bad.safetensors", load_state_dict(path)[0], meta)
    with pytest.raises(DimapError, match="unknown arch 'keras-swin'"):
        load_shrunk(bad)

    class MySwin(transformers.SwinForImageClassification):
        pass

    with pytest.raises(DimapError, match="cannot record how to rebuild MySwin"):
        save_shrunk(MySwin(config), tmp_path / "mine.safetensors")


def test_one_home_for_the_input_size(tmp_path):
    transformers = pytest.importorskip("transformers")
    from dimap_fast.arch import find_adapter
    from dimap_fast.engine.flops import input_shape
    from dimap_fast.io.models import model_image_size
    from dimap_fast.train import small_swin

    timm_model = small_swin(image_size=32)
    hf = transformers.SwinModel(transformers.SwinConfig(image_size=48, num_channels=1, patch_size=4, embed_dim=16,
                                                        depths=[2], num_heads=[2], window_size=4))
    assert find_adapter(timm_model).input_size(timm_model) == (3, 32, 32)
    assert find_adapter(hf).input_size(hf) == (1, 48, 48) and model_image_size(hf) == 48
    assert input_shape(hf, None) == (1, 1, 48, 48) and input_shape(hf, 64) == (1, 1, 64, 64)
    timm_model.set_input_size((64, 64))  # patch_embed follows: so does the size every caller reads
    assert input_shape(timm_model, None) == (1, 3, 64, 64) and model_image_size(timm_model) == 64
    assert find_adapter(torch.nn.Linear(2, 2)).input_shape(torch.nn.Linear(2, 2), batch=8) == (8, 3, 224, 224)
