"""report --throughput times a fair pair: the dense model on the attention path the model runs."""

import pytest
import torch
from timm.models import swin_transformer as timm_swin

from dimap_fast.cli.throughput import check_same_attention_path


def _small():
    torch.manual_seed(0)
    return timm_swin.SwinTransformer(img_size=16, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1),
                                     num_heads=(1, 2), num_classes=4).eval()


def _flags(model):
    return [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]


@pytest.mark.parametrize("sdpa", [True, False])
def test_dense_follows_the_models_attention_path(sdpa):
    dense, model = _small(), _small()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = sdpa
    for m in dense.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = not sdpa
    check_same_attention_path(dense, model)
    assert _flags(dense) == [sdpa] * len(_flags(model)) and _flags(dense)


def test_a_module_missing_by_name_takes_sdpa_when_the_model_uses_it():
    dense, model = _small(), _small()
    model.layers[1].blocks[0].attn.fused_attn = True
    model.layers = model.layers[1:]  # names no longer line up with dense's
    check_same_attention_path(dense, model)
    assert all(_flags(dense))


def test_compare_throughput_times_dense_on_the_models_path(monkeypatch):
    """Every pair it times runs one attention path: a model on SDPA is never set beside an eager dense."""
    from types import SimpleNamespace

    import dimap_fast.io.models as loading
    import dimap_fast.cli.throughput as speed

    model = _small()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    timed = []
    monkeypatch.setattr(loading, "demo_model_from_metadata", lambda meta: _small())  # built on eager
    monkeypatch.setattr(speed, "images_per_second", lambda m, shape: timed.append(set(_flags(m))) or 1.0)
    out = speed.compare_throughput(SimpleNamespace(model=model, arch=None, metadata={}), batch=1, input_size=16)
    assert out["attention"] == "sdpa"
    assert timed and all(flags <= {True} for flags in timed), timed
