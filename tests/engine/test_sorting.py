"""The host's sort choice: both candidates sort alike, the choice is measured once and cached."""

import json

import numpy as np
import pytest
import torch

import dimap_fast
from dimap_fast.engine import sorting
from dimap_fast.errors import DimapError


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("DIMAP_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DIMAP_FAST_SORT", raising=False)
    monkeypatch.setattr(sorting, "_chosen", None)
    return tmp_path


@pytest.mark.parametrize("method", sorting.CANDIDATES)
def test_each_sort_orders_negated_magnitudes_like_numpy(method):
    w = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    w[::7] = 0.0
    w[3] = -0.0
    w[10:20] = 0.5  # ties
    neg = -np.abs(w.numpy())
    got, want = neg.copy(), np.sort(neg)
    sorting.sort_negated(got, method)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("method", sorting.CANDIDATES)
def test_a_nan_is_refused_whichever_sort_ran(monkeypatch, method):
    monkeypatch.setenv("DIMAP_FAST_SORT", method)
    state = {"layers.0.blocks.0.attn.qkv.weight": torch.randn(12, 4)}
    state["layers.0.blocks.0.attn.qkv.weight"][1, 1] = float("nan")
    with pytest.raises(DimapError, match="qkv"):
        dimap_fast.plan(state)


def test_measured_once_then_read_from_the_cache(fresh, monkeypatch):
    calls = []
    monkeypatch.setattr(sorting, "measure", lambda: calls.append(1) or {"numpy": 2.0, "torch": 1.0})
    first = sorting.choice()
    assert first["sort"] == "torch" and "measured now" in first["why"] and calls == [1]
    monkeypatch.setattr(sorting, "_chosen", None)  # a new process
    again = sorting.choice()
    assert again["sort"] == "torch" and "cached" in again["why"] and calls == [1]
    data = json.loads((fresh / sorting.CACHE_NAME).read_text())
    assert data["entries"][sorting.host_key()] == {"numpy": 2.0, "torch": 1.0}
    assert [p.name for p in fresh.iterdir()] == [sorting.CACHE_NAME]  # no temporary left


def test_the_environment_forces_a_sort(fresh, monkeypatch):
    monkeypatch.setenv("DIMAP_FAST_SORT", "torch")
    assert sorting.choice()["sort"] == "torch"
    assert not (fresh / sorting.CACHE_NAME).exists()
