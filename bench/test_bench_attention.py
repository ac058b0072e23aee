"""The fused window attention beside timm's paths: attention alone, the whole block and whole
Swins, forward and forward + backward, in one run.

GPU rows (skipped without CUDA), batch 128 at 224 (window 7) and batch 32 at 384 (window 12):
  - "attn": the attention half of a block from its normalized tokens (qkv Linear, shifted-window
    attention, proj) — timm eager (roll/pad/partition/softmax/reverse), timm's SDPA path
    (``attn.fused_attn = True``: what ``timm.layers.set_fused_attn(True, experimental=True)`` or
    TIMM_FUSED_ATTN=2 turns on for Swin), ``torch.compile`` of timm eager, and ours;
  - "block": the whole block, timm eager vs dimap_fast.nn.SwinBlock;
  - "model": whole Swin-B, inference and one training step (autocast fp16), and the peak memory
    of the training step: timm eager, timm on its SDPA path, ours.
Targets (issue "Fused window attention that trains", H100/H200): attention forward, fp16, Swin-B
stage 1 >= 3.5x timm eager and >= 1.5x timm SDPA; forward + backward >= 2x timm eager; Swin-B
fp16 inference >= 1.25x timm on SDPA, a training step >= 1.15x timm on SDPA with lower peak
memory (the whole-model rows over timm's eager default are shown as the eager comparison). A
target whose row is missing is not met.

CPU row (anywhere), shown, not a target: a Swin-B stage-3 block's training step, timm vs the
drop-in, which runs timm's own code on the CPU (the same code twice).
"""

import copy

import pytest
import timm
import torch
from results import RESULTS, record
from timm.models import swin_transformer as timm_swin

import dimap_fast.nn as dnn

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
# name: (resolution, channels, heads, window, batch)
STAGES = {"swin_t.s1": (56, 96, 3, 7, 128), "swin_b.s1": (56, 128, 4, 7, 128),
          "swin_b.s3": (14, 512, 16, 7, 128), "swin_b384.s1": (96, 128, 4, 12, 32)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
VARIANTS = ("eager", "sdpa", "compile", "fused")
_CACHE = {}


def block_pair(stage, device, dtype, seed=0):
    """(timm block, dimap_fast.nn.SwinBlock copy) for a stage, shifted windows."""
    res, c, heads, window, _ = STAGES[stage]
    torch.manual_seed(seed)
    timm_blk = timm_swin.SwinTransformerBlock(c, (res, res), num_heads=heads, window_size=window,
                                              shift_size=window // 2).to(device, dtype)
    ours = dnn.SwinBlock.adopt(copy.deepcopy(timm_blk))
    return timm_blk, ours


def attention_fn(stage, variant, dtype):
    """A callable x -> attention output (B, H, W, C) of the variant, on CUDA."""
    key = (stage, variant, dtype)
    if key not in _CACHE:
        timm_blk, ours = block_pair(stage, "cuda", dtype)
        if variant == "fused":
            fn = lambda x: ours.attn.proj(dnn_kernel(ours, x))  # noqa: E731
        else:
            timm_blk.attn.fused_attn = variant == "sdpa"
            fn = torch.compile(timm_blk._attn) if variant == "compile" else timm_blk._attn
        _CACHE[key] = (fn, timm_blk if variant != "fused" else ours)
    return _CACHE[key]


def dnn_kernel(blk, x):
    from dimap_fast.kernels import window_attention

    a = blk.attn
    return window_attention(a.qkv(x), a.relative_position_bias_table, a.num_heads,
                            blk.window_size, blk.shift_size, qkv_bias=a.qkv.bias, scale=a.scale)


def cuda_timed(fn):
    def go():
        out = fn()
        torch.cuda.synchronize()
        return out
    return go


def tokens(stage, dtype, grad=False):
    res, c, _, _, batch = STAGES[stage]
    x = torch.randn(batch, res, res, c, device="cuda", dtype=dtype)
    return x.requires_grad_(grad)


@needs_cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_gpu_attention(benchmark, mode, stage, dtype, variant):
    fn, module = attention_fn(stage, variant, DTYPES[dtype])
    x = tokens(stage, DTYPES[dtype], grad=mode == "fwd_bwd")
    benchmark.pedantic(step(fn, module, x, mode), rounds=20, iterations=1, warmup_rounds=3)
    record(f"gpu/attn/{mode}/{stage}/{dtype}/{variant}", benchmark)


def step(fn, module, x, mode):
    """One synchronized forward ("fwd", inference mode) or forward + backward of ``fn`` on x."""
    if mode == "fwd":
        def run():
            with torch.inference_mode():
                return fn(x)
    else:
        g = torch.randn(x.shape, device="cuda", dtype=x.dtype)

        def run():
            module.zero_grad(set_to_none=True)
            fn(x).backward(g)
    return cuda_timed(run)


@needs_cuda
@pytest.mark.parametrize("variant", ["eager", "fused"])
@pytest.mark.parametrize("stage", ["swin_b.s1", "swin_b384.s1"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_gpu_block(benchmark, mode, stage, variant):
    timm_blk, ours = block_pair(stage, "cuda", torch.float16)
    blk = ours if variant == "fused" else timm_blk
    x = tokens(stage, torch.float16, grad=mode == "fwd_bwd")
    benchmark.pedantic(step(blk, blk, x, mode), rounds=20, iterations=1, warmup_rounds=3)
    record(f"gpu/block/{mode}/{stage}/{variant}", benchmark)


def swin_b(variant):
    torch.manual_seed(0)
    model = timm.create_model("swin_base_patch4_window7_224").cuda()
    for mod in model.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = variant == "sdpa"
    return dnn.convert(model) if variant == "fused" else model


@needs_cuda
@pytest.mark.parametrize("variant", ["timm", "sdpa", "fused"])
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_gpu_swin_b(benchmark, mode, variant):
    model = swin_b(variant)
    x = torch.randn(128 if mode == "infer" else 64, 3, 224, 224, device="cuda")
    if mode == "infer":
        model = model.half().eval()
        x = x.half()

        def run():
            with torch.inference_mode():
                return model(x)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        labels = torch.randint(0, 1000, (x.shape[0],), device="cuda")

        def run():
            with torch.autocast("cuda", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    benchmark.pedantic(cuda_timed(run), rounds=10, iterations=1, warmup_rounds=3)
    record(f"gpu/swin_b/{mode}/{variant}", benchmark)
    if mode == "train":
        torch.cuda.reset_peak_memory_stats()
        cuda_timed(run)()
        RESULTS[f"gpu/swin_b/peak/{variant}"] = torch.cuda.max_memory_allocated() / 2**30
    del model


# ---- CPU: the drop-in runs timm's own code ----

def test_cpu_block_training_step(benchmark):
    import time

    from dimap_fast.train import flush_denormals

    timm_blk, ours = block_pair("swin_b.s3", "cpu", torch.float32)
    x = torch.randn(8, 14, 14, 512, requires_grad=True)
    g = torch.randn(8, 14, 14, 512)
    best = {"timm": float("inf"), "dropin": float("inf")}

    def step(blk):
        blk.zero_grad(set_to_none=True)
        blk(x).backward(g)

    def round_():
        # both variants back to back in every round: a slow spell of the shared host hits both
        with flush_denormals():
            for name, blk in (("timm", timm_blk), ("dropin", ours)):
                t0 = time.perf_counter()
                step(blk)
                best[name] = min(best[name], time.perf_counter() - t0)
    benchmark.pedantic(round_, rounds=7, iterations=1, warmup_rounds=1)
    RESULTS.update({f"cpu/block_train/{k}": v for k, v in best.items()})


# ---- summary: ratios of this run ----

def _speedup(slow, fast):
    if slow not in RESULTS or fast not in RESULTS:
        return None
    return RESULTS[slow] / RESULTS[fast]


def test_summary(bench_report):
    cpu = _speedup("cpu/block_train/timm", "cpu/block_train/dropin")
    assert cpu is not None, "run the whole file: the CPU rows above record what this compares"
    print(f"\nCPU Swin-B s3 block training step, timm -> drop-in: {cpu:.2f}x (not a target: timm's code both)")
    if not CUDA:
        return
    print(f"GPU {torch.cuda.get_device_name()}: speed-up of the fused attention over each baseline")
    for mode in ("fwd", "fwd_bwd"):
        for stage in STAGES:
            for dtype in DTYPES:
                base = f"gpu/attn/{mode}/{stage}/{dtype}"
                ups = [_speedup(f"{base}/{v}", f"{base}/fused") for v in VARIANTS[:3]]
                cells = "  ".join("  n/a" if u is None else f"{u:5.2f}x" for u in ups)
                print(f"  {mode:<8}{stage:<14}{dtype:<6} eager/sdpa/compile: {cells}")
    targets = {
        "fp16 Swin-B s1 forward vs eager >= 3.5x": (
            _speedup("gpu/attn/fwd/swin_b.s1/fp16/eager", "gpu/attn/fwd/swin_b.s1/fp16/fused"), 3.5),
        "fp16 Swin-B s1 forward vs SDPA >= 1.5x": (
            _speedup("gpu/attn/fwd/swin_b.s1/fp16/sdpa", "gpu/attn/fwd/swin_b.s1/fp16/fused"), 1.5),
        "fp16 Swin-B s1 forward+backward vs eager >= 2x": (
            _speedup("gpu/attn/fwd_bwd/swin_b.s1/fp16/eager",
                     "gpu/attn/fwd_bwd/swin_b.s1/fp16/fused"), 2.0),
        "Swin-B fp16 inference vs timm SDPA >= 1.25x": (
            _speedup("gpu/swin_b/infer/sdpa", "gpu/swin_b/infer/fused"), 1.25),
        "Swin-B training step vs timm SDPA >= 1.15x": (
            _speedup("gpu/swin_b/train/sdpa", "gpu/swin_b/train/fused"), 1.15),
    }
    for mode in ("infer", "train"):  # the eager comparison, shown
        up = _speedup(f"gpu/swin_b/{mode}/timm", f"gpu/swin_b/{mode}/fused")
        print(f"  Swin-B {mode} vs timm eager (eager comparison): {'missing' if up is None else f'{up:.2f}x'}")
    peak_t, peak_f = RESULTS.get("gpu/swin_b/peak/sdpa"), RESULTS.get("gpu/swin_b/peak/fused")
    for name, (value, want) in targets.items():
        print(f"  {name:<48} {'missing' if value is None else f'{value:.2f}x'}")
    print(f"  training step peak memory, timm SDPA -> fused: {peak_t} -> {peak_f} GiB")
    missing = [n for n, (v, _) in targets.items() if v is None] + (
        ["peak memory"] if None in (peak_t, peak_f) else [])
    assert not missing, f"rows missing (a target whose row is missing is not met): {missing}"
    assert all(v >= want for v, want in targets.values()), "a fused-attention target is not met"
    assert peak_f < peak_t, "the converted Swin-B's training step does not use less memory"
