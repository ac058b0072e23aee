"""Scoring speed and memory: the engine beside the LAMP-style reference and the sort floor.

Run with `make bench`. The last tests compare what the earlier ones measured in this same run:
- Swin-B, one ratio, CPU: >= 25x faster than the LAMP-style reference, <= 2x the sort floor;
- 20 ratios (cutoffs only) <= 1.3x one ratio;
- extra memory while planning Swin-B <= 1.5x its prunable weights;
- GPU (when present): Swin-B plan plus masks <= 3 ms.
"""

import tracemalloc

import numpy as np
import pytest
import timm
import torch
from results import RESULTS, record
from lamp_reference import lamp_reference_masks

import dimap_fast
from dimap_fast.modules import prunable_layers

MODELS = ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224"]
SHORT = {m: m.split("_")[1] for m in MODELS}
SWEEP = [round(0.05 * i, 2) for i in range(20)]
_STATES = {}


def state(name):
    if name not in _STATES:
        torch.manual_seed(0)
        _STATES.clear()  # one model in memory at a time
        _STATES[name] = timm.create_model(name).state_dict()
    return _STATES[name]


@pytest.mark.parametrize("model", MODELS)
def test_sort_floor(benchmark, model):
    mags = [np.abs(layer.tensor.numpy()).ravel() for layer in prunable_layers(state(model))]
    benchmark.pedantic(lambda: [np.sort(m) for m in mags], rounds=3, iterations=1)
    record(f"floor/{SHORT[model]}", benchmark)


@pytest.mark.parametrize("model", MODELS)
def test_engine_one_ratio_masks(benchmark, model):
    sd = state(model)
    benchmark.pedantic(lambda: dimap_fast.plan(sd).masks(0.5), rounds=3, iterations=1)
    record(f"engine/{SHORT[model]}", benchmark)


@pytest.mark.parametrize("model", MODELS)
def test_engine_one_ratio_cutoffs(benchmark, model):
    sd = state(model)
    benchmark.pedantic(lambda: dimap_fast.plan(sd).cutoffs(0.5), rounds=3, iterations=1)
    record(f"cutoffs1/{SHORT[model]}", benchmark)


@pytest.mark.parametrize("model", MODELS)
def test_engine_20_ratio_cutoffs(benchmark, model):
    sd = state(model)

    def run():
        p = dimap_fast.plan(sd)
        return [p.cutoffs(r) for r in SWEEP]

    benchmark.pedantic(run, rounds=3, iterations=1)
    record(f"cutoffs20/{SHORT[model]}", benchmark)


@pytest.mark.parametrize("model", MODELS)
def test_lamp_reference(benchmark, model):
    layers = [(l.name, l.module, l.tensor) for l in prunable_layers(state(model))]
    benchmark.pedantic(lambda: lamp_reference_masks(layers, 0.5), rounds=1, iterations=1)
    record(f"lamp/{SHORT[model]}", benchmark)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("model", MODELS)
def test_gpu_plan_and_masks(benchmark, model):
    sd = {k: v.cuda() for k, v in state(model).items()}
    dimap_fast.plan(sd).masks(0.5)  # compile the kernels outside the timing

    def run():
        masks = dimap_fast.plan(sd).masks(0.5)
        torch.cuda.synchronize()
        return masks

    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=2)
    record(f"gpu/{SHORT[model]}", benchmark)


def test_plan_memory_swin_base():
    sd = state(MODELS[-1])
    weights = sum(l.numel * 4 for l in prunable_layers(sd))
    tracemalloc.start()
    p = dimap_fast.plan(sd)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    RESULTS["memory/base"] = peak / weights
    RESULTS["held/base"] = p._scorer.nbytes() / weights


def test_targets_measured_in_this_run():
    rows = []
    for m in SHORT.values():
        e, f, l = RESULTS.get(f"engine/{m}"), RESULTS.get(f"floor/{m}"), RESULTS.get(f"lamp/{m}")
        c1, c20 = RESULTS.get(f"cutoffs1/{m}"), RESULTS.get(f"cutoffs20/{m}")
        if None in (e, f, l, c1, c20):
            continue
        rows.append((m, l, f, e, l / e, e / f, c20 / c1))
    print("\nmodel   LAMP-style s   sort floor s   engine s   speed-up vs LAMP   engine/floor   20 ratios/1")
    for m, l, f, e, up, fl, sw in rows:
        print(f"{m:<7}{l:>14.3f}{f:>15.3f}{e:>11.3f}{up:>19.1f}x{fl:>14.2f}x{sw:>13.2f}x")
    if "memory/base" in RESULTS:
        print(f"Swin-B planning: peak extra {RESULTS['memory/base']:.2f}x the prunable weights, plan holds {RESULTS['held/base']:.2f}x")
    for m in SHORT.values():
        if f"gpu/{m}" in RESULTS:
            print(f"GPU {torch.cuda.get_device_name()}: {m} plan+masks {RESULTS[f'gpu/{m}'] * 1e3:.2f} ms")
    base = [r for r in rows if r[0] == "base"]
    assert base, "run the whole file: the targets compare benchmarks of this run"
    _, _, _, _, up, fl, sw = base[0]
    assert up >= 25, f"engine only {up:.1f}x faster than the LAMP-style reference"
    assert fl <= 2.0, f"engine takes {fl:.2f}x the sort floor"
    assert sw <= 1.3, f"20 ratios cost {sw:.2f}x one ratio"
    assert RESULTS["memory/base"] <= 1.5, f"planning peaks at {RESULTS['memory/base']:.2f}x the weights"
    if torch.cuda.is_available():  # a missing GPU row is a target not met
        assert "gpu/base" in RESULTS, "the Swin-B GPU row is missing: its benchmark failed"
        assert RESULTS["gpu/base"] <= 3e-3
