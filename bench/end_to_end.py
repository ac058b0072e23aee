"""The pruned Swins of issue 14's end-to-end rows, built one way for the CPU bench
(bench/test_bench_end_to_end.py) and the GPU check (gpu/speed.py's end-to-end job).

Variants of one random-init model (seed 0, ``pretrained=False``):
- dense: timm's model on its SDPA attention path (``fused_attn``), the path shrink's models run;
- shrunk -30% / -50%: channel DIMAP at ``Plan.ratio_for_flops(0.3 / 0.5)``, masks applied, then
  ``dimap_fast.shrink``; the -50% one is checked against the channel-masked model's logits;
- block 50% / 75%: block DIMAP (32x32 tiles) at ratio 0.5 / 0.75, masks applied, then
  ``dimap_fast.convert(model, block=32)``;
- block 50% / 75% unconverted (asked for by name, UNCONVERTED): the same masked models left as
  timm's, on SDPA: what convert is measured against.
One plan per pattern serves both of its ratios (the plan is ratio-independent).
On the CPU the dense and shrunk models are converted too (``convert(choose="dense")``), so every
row runs dimap_fast.nn's drop-in blocks and their CPU inference path (faster than timm's eager
forward for all of them: bench/test_bench_shrink.py puts the two side by side) and the ratios
are of pruning alone; on a GPU they stay timm's models on SDPA.
"""

from __future__ import annotations

import copy
import inspect
from collections import Counter
from dataclasses import dataclass

import torch

import dimap_fast

MODELS = {"swin_t": "swin_tiny_patch4_window7_224", "swin_b": "swin_base_patch4_window7_224"}
VARIANTS = ("dense", "shrunk -30%", "shrunk -50%", "block 50%", "block 75%")
UNCONVERTED = ("block 50% unconverted", "block 75% unconverted")
BLOCK = 32
_SHRUNK = {"shrunk -30%": 0.3, "shrunk -50%": 0.5}
_BLOCKED = {"block 50%": 0.5, "block 75%": 0.75}


@dataclass
class Variant:
    model: torch.nn.Module
    how: str  # what was asked and the ratio chosen
    gflops: float  # as dimap_fast.report counts: the shrunk architecture, or zeroed weights removed
    mparams: float  # parameters (millions): the shrunk model's, or the nonzero ones
    note: str = ""


def timm_model(short: str, seed: int = 0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(MODELS[short], pretrained=False).eval()


def _masked(model, masks) -> torch.nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    return out


def _sdpa(model) -> torch.nn.Module:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    return model


def build_variants(dense: torch.nn.Module, variants=VARIANTS, block: int = BLOCK, check_size: int = 2,
                   input_size=None, batch: int = 32, device="cpu", dtype=torch.float32) -> dict[str, Variant]:
    """{variant: Variant} of models on ``device`` in ``dtype``, planned and shrunk on the CPU in
    float32 from ``dense`` (which is left as it was); ``batch``: the batch they will run, for
    convert's per-layer choice where it has one."""
    dense = dense.eval()
    size = input_size or getattr(dense.patch_embed, "img_size", (224, 224))
    out = {}
    if "dense" in variants:
        rep = dimap_fast.report(dense)
        out["dense"] = Variant(_sdpa(copy.deepcopy(dense)), "-", rep["flops"]["dense"] / 1e9,
                               rep["params"]["dense"] / 1e6)
    if any(v in _SHRUNK for v in variants):
        plan = dimap_fast.plan(dense, pattern="channel")
        for v in (v for v in variants if v in _SHRUNK):
            ratio = plan.ratio_for_flops(_SHRUNK[v])
            masked = _masked(dense, plan.masks(ratio))
            shrunk = dimap_fast.shrink(copy.deepcopy(masked)).eval()
            note = ""
            if v == "shrunk -50%":  # the issue asks for the masked model's logits
                x = torch.randn(check_size, 3, *size, generator=torch.Generator().manual_seed(1))
                with torch.no_grad():
                    want = _sdpa(masked)(x)
                    off = float((shrunk(x) - want).abs().max())
                note = f"max |logit - masked| {off:.1e}"
            rep = dimap_fast.report(shrunk)
            out[v] = Variant(shrunk, f"channel, ratio {ratio:.3f}", rep["flops"]["dense"] / 1e9,
                             rep["params"]["dense"] / 1e6, note)
            del masked
    if any(v in _BLOCKED or v in UNCONVERTED for v in variants):
        plan = dimap_fast.plan(dense, pattern="block", block_size=block)
        for v in (v for v in _BLOCKED if v in variants or f"{v} unconverted" in variants):
            ratio = _BLOCKED[v]
            masked = _sdpa(_masked(dense, plan.masks(ratio)))
            rep = dimap_fast.report(masked)  # counted before convert: the zeros are what it counts
            if f"{v} unconverted" in variants:
                out[f"{v} unconverted"] = Variant(copy.deepcopy(masked), f"block {block}, ratio {ratio:.2f}",
                                                  rep["flops"]["pruned"] / 1e9, rep["params"]["pruned"] / 1e6,
                                                  "timm's forward, SDPA")
            if v not in variants:
                continue
            kw = {"batch_size": batch} if "batch_size" in inspect.signature(dimap_fast.convert).parameters else {}
            # converted where it will run: a per-layer choice measured on the CPU would not hold on a GPU
            model = dimap_fast.convert(masked.to(device, dtype), block=block, **kw)
            out[v] = Variant(model, f"block {block}, ratio {ratio:.2f}", rep["flops"]["pruned"] / 1e9,
                             rep["params"]["pruned"] / 1e6, _chosen(model))
    for v in out:
        out[v].model = out[v].model.to(device, dtype)
        if torch.device(device).type == "cpu" and not v.startswith("block"):  # unconverted stays timm's
            out[v].model = dimap_fast.convert(out[v].model, choose="dense")
    return {v: out[v] for v in variants}


def _chosen(model) -> str:
    """What convert made of the prunable Linears: its per-layer report where it keeps one."""
    report = getattr(model, "dimap_convert_report", None)
    if report is None:
        return f"{sum(type(m).__name__ == 'SparseLinear' for m in model.modules())} SparseLinear"
    counts = Counter(row.chosen for row in report)
    return "convert chose " + ", ".join(f"{k} {n}" for k, n in counts.most_common())


def table(batch: int, variants: dict[str, Variant], seconds: dict[str, float], title: str) -> list[str]:
    """The printed rows: images/s and the ratio to dense beside FLOPs and parameters."""
    dense = seconds.get("dense")
    lines = [title, f"{'variant':<23}{'pruning':<23}{'GFLOPs':>8}{'params M':>10}{'images/s':>10}"
                    f"{'vs dense':>10}  note"]
    for v, var in variants.items():
        t = seconds.get(v)
        ips = f"{batch / t:10.2f}" if t else f"{'missing':>10}"
        ratio = f"{dense / t:9.2f}x" if t and dense else f"{'-':>10}"
        lines.append(f"{v:<23}{var.how:<23}{var.gflops:8.2f}{var.mparams:10.1f}{ips}{ratio}  {var.note}")
    return lines
