"""Channel pruning made physical: CPU images/s of dense vs shrunk Swin-T, measured in one run.

Target (issue "Channel and head DIMAP"): Swin-T at 50% channel pruning >= 1.6x dense throughput,
end to end, batch 32 at 224, on this CPU.
"""

import copy
import time

import timm
import torch
from results import RESULTS

import dimap_fast
from dimap_fast.train import flush_denormals

BATCH = 32
_MODELS = {}


def model_at(ratio):
    if ratio not in _MODELS:
        torch.manual_seed(0)
        model = timm.create_model("swin_tiny_patch4_window7_224").eval()
        if ratio > 0:
            dimap_fast.plan(model, pattern="channel").prune_(ratio)
            model = dimap_fast.shrink(copy.deepcopy(model))
        _MODELS[ratio] = model
    return _MODELS[ratio]


RATIOS = (0.0, 0.3, 0.5)


def test_swin_tiny_images_per_second(benchmark):
    # one round times every model back to back, so a slow spell of this shared machine hits them all alike
    models = {r: model_at(r) for r in RATIOS}
    x = torch.randn(BATCH, 3, 224, 224)
    times = {r: [] for r in RATIOS}

    def one_round():
        with torch.no_grad(), flush_denormals():
            for r, model in models.items():
                started = time.perf_counter()
                model(x)
                times[r].append(time.perf_counter() - started)

    one_round()  # warm-up, not kept
    for r in RATIOS:
        times[r].clear()
    benchmark.pedantic(one_round, rounds=5, iterations=1)
    for r in RATIOS:
        RESULTS[f"shrink/{r}"] = min(times[r])


def test_shrink_speedup_in_this_run():
    dense = RESULTS.get("shrink/0.0")
    assert dense is not None, "run the whole file"
    print(f"\nSwin-T, batch {BATCH}, 224 px, CPU ({torch.get_num_threads()} threads)")
    print("channel ratio   params (M)   GFLOPs   images/s   speed-up   FLOPs bound")
    dense_flops = dimap_fast.report(model_at(0.0))["flops"]["dense"]
    for ratio in RATIOS:
        t = RESULTS[f"shrink/{ratio}"]
        rep = dimap_fast.report(model_at(ratio))
        # what the speed-up would be if time followed FLOPs exactly: the ceiling for this pruning
        print(f"{ratio:>13.0%}{rep['params']['dense'] / 1e6:>13.1f}{rep['flops']['dense'] / 1e9:>9.2f}"
              f"{BATCH / t:>11.1f}{dense / t:>10.2f}x{dense_flops / rep['flops']['dense']:>13.2f}x")
    kept = dimap_fast.plan(model_at(0.0), pattern="channel").sparsity(0.5)["layers"]
    stages = {}
    for name, removed in kept.items():
        stages.setdefault(name.split(".")[1], []).append(1 - removed)
    print("kept at 50%, per stage (mean of its blocks' MLPs and attentions): "
          + ", ".join(f"stage {s} {sum(v) / len(v):.0%}" for s, v in stages.items()))
    assert dense / RESULTS["shrink/0.5"] >= 1.6, "50% channel pruning below 1.6x dense throughput"
