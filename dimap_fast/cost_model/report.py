"""The static report: one row per estimate, shaped like the GPU check's (name, value, unit, target,
met), each target on one row; every value is an estimate for an H100 (hardware.py), none measured.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..atomic import write_text_atomic
from . import masks_cost, worker
from .baselines import cublas_seconds, timm_attention_span
from .hardware import H100
from .kernel_cost import estimate
from .workloads import DTYPES, Attention, attention_workloads, sparse_workloads

_B1 = "attention.fwd.swin_b.s1.fp16"
TARGETS = {  # row -> (op, bound, unit): issue 21's and 22's Done-when lines
    f"{_B1}.vs_floor": ("<=", 2.0, "x"), f"{_B1}.vs_eager": (">=", 2.5, "x"),
    f"{_B1}.vs_sdpa": (">=", 1.3, "x"), f"{_B1}.spill": ("==", 0, "B"),
    f"{_B1}.resident_blocks": (">=", 2, "blocks"),
    "attention.fwd.swin_b.s1.w12_384.fp16.vs_floor": ("<=", 2.5, "x"),
    "attention.fwd_bwd.swin_b.s1.fp16.vs_eager": (">=", 1.5, "x"),
    "attention.fwd_bwd.swin_b.s1.fp16.fenced_atomics_in_loops": ("==", 0, "atomics"),
    "sparse_linear.swin_b.s3.mlp.75.fp16.vs_cublas": (">=", 1.5, "x"),
    "masks.swin_b.cuda": ("<=", 3.0, "ms"),
}
_OPS = {"<=": float.__le__, ">=": float.__ge__, "==": float.__eq__}


def _row(name, value, unit, note=""):
    t = TARGETS.get(name)
    target = None if t is None else f"{t[0]} {t[1]:g}" + ("x" if t[2] == "x" else f" {t[2]}")
    met = None if t is None or value is None else _OPS[t[0]](float(value), float(t[1]))
    return dict(name=name, value=value, unit=unit, target=target, met=met, note=note,
                estimate=True)


def _kernels(captured):
    """(workload, [(launch, KernelEstimate)]): every launch compiled (disk-cached) and estimated."""
    specs = [(l["module"], l["kernel"], l["spec"]) for c in captured for l in c["launches"]]
    sass = iter(worker.call("compile", specs))
    out = []
    for c in captured:
        est = [(l, estimate(l["kernel"], next(sass), l["replay"], l["file"], l["loops"],
                            l["programs"])) for l in c["launches"]]
        out.append((c, est))
    return out


def _note(e) -> str:
    return (f"{e.name}: {e.regs} regs, {e.shared // 1024} KiB shared, {e.resident} blocks/SM, "
            f"spill {e.spill} B, {e.sass_per_program:.0f} SASS/warp/program, {e.tensor_insns} MMA "
            f"insns, {e.bytes / 1e6:.0f} MB, {e.bound}-bound")


def attention_rows(c, est) -> list[dict]:
    w: Attention = c["workload"]
    kernel_s = sum(e.seconds for _, e in est)
    launcher_s = H100.memory_seconds(c["torch_bytes"])  # the launcher's own torch ops
    span_s = kernel_s + launcher_s
    floor_s = H100.memory_seconds(w.floor_bytes())
    dt = DTYPES[w.dtype]
    eager = timm_attention_span(w.model, dt, False, w.backward, w.batch, w.image, w.window)
    sdpa = timm_attention_span(w.model, dt, True, w.backward, w.batch, w.image, w.window)
    rows = [_row(f"{w.name}.kernel_ms", kernel_s * 1e3, "ms", "; ".join(_note(e) for _, e in est)),
            _row(f"{w.name}.floor_ms", floor_s * 1e3, "ms", f"{w.floor_bytes() / 1e6:.0f} MB"),
            _row(f"{w.name}.vs_floor", kernel_s / floor_s, "x"),
            _row(f"{w.name}.vs_eager", eager.seconds / span_s, "x",
                 f"timm eager {eager.seconds * 1e3:.3f} ms ({eager.count} ops, lower bound), span "
                 f"{span_s * 1e3:.3f} ms incl. {c['torch_ops']} torch ops of the launcher"),
            _row(f"{w.name}.vs_sdpa", sdpa.seconds / span_s, "x",
                 f"timm SDPA {sdpa.seconds * 1e3:.3f} ms ({sdpa.count} ops, lower bound)"),
            _row(f"{w.name}.spill", max(e.spill for _, e in est), "B"),
            _row(f"{w.name}.resident_blocks", min(e.resident for _, e in est), "blocks")]
    if w.backward:
        rows.append(_row(f"{w.name}.fenced_atomics_in_loops",
                         sum(e.fenced_atomics_in_loops for _, e in est), "atomics"))
    return rows


def sparse_rows(c, est) -> list[dict]:
    w = c["workload"]
    # An autotuned launch: the candidate the model finds fastest, as autotuning would pick.
    by_shape = {}
    for launch, e in est:
        key = tuple(launch["spec"]["signature"].items()), launch["grid"] if not launch["candidate"] else None
        by_shape.setdefault(launch["replay"].footprint.get("x_ptr"), []).append(e)
    ours = sum(min(es, key=lambda e: e.seconds).seconds for es in by_shape.values())
    dense = sum(cublas_seconds(m, k, n, DTYPES[w.dtype]) for m, k, n in w.shapes())
    best = "; ".join(_note(min(es, key=lambda e: e.seconds)) for es in by_shape.values())
    return [_row(f"{w.name}.kernel_ms", ours * 1e3, "ms", best),
            _row(f"{w.name}.cublas_ms", dense * 1e3, "ms",
                 f"dense at {H100.cublas_fraction:.0%} of the tensor peak, or its bytes"),
            _row(f"{w.name}.vs_cublas", dense / ours, "x")]


def masks_rows() -> list[dict]:
    rows = []
    for m, r in zip(masks_cost.MODELS, worker.call("masks", list(masks_cost.MODELS))):
        s = masks_cost.seconds(r, H100)
        rows.append(_row(f"masks.{m}.cuda", s * 1e3, "ms",
                         f"{r.launches} Triton launches + {r.torch_ops} torch ops at "
                         f"{H100.launch_s * 1e6:.0f} us, {r.syncs} host reads at "
                         f"{H100.sync_s * 1e6:.0f} us, {r.bytes / 1e6:.0f} MB; one read of the "
                         f"{r.weights / 1e6:.1f}M weights {masks_cost.floor_seconds(r, H100) * 1e3:.3f} ms"))
    return rows


def build(include_masks: bool = True) -> list[dict]:
    workloads = attention_workloads() + sparse_workloads()
    rows = []
    for c, est in _kernels(worker.call("capture", workloads)):
        rows += attention_rows(c, est) if isinstance(c["workload"], Attention) else sparse_rows(c, est)
    if include_masks:
        rows += masks_rows()
    return rows


def estimate_for(row_name: str, rows: list[dict] | None = None) -> float | None:
    """This model's estimate for a GPU-check row (bench/gpu_check*.py names), None where it has none."""
    mapping = {"speed.attn_memory_floor.swin_b.s1.fp16": f"{_B1}.vs_floor",
               "speed.block_attn.swin_b.s1.fp16.fused_vs_sdpa": f"{_B1}.vs_sdpa",
               "speed.attn_train.swin_b.s1.fp16.fused_vs_eager": "attention.fwd_bwd.swin_b.s1.fp16.vs_eager",
               "speed.linear.s3_mlp.fp16.b64.t75": "sparse_linear.swin_b.s3.mlp.75.fp16.vs_cublas",
               "speed.linear.s1_mlp.fp16.b64.t75": "sparse_linear.swin_b.s1.mlp.75.fp16.vs_cublas"}
    for s in ("swin_t.s1", "swin_b.s1"):
        mapping[f"speed.block_attn.{s}.fp16.fused_vs_eager"] = f"attention.fwd.{s}.fp16.vs_eager"
    mapping["speed.plan.swin_b"] = "masks.swin_b.cuda"
    name = mapping.get(row_name, row_name)
    rows = rows if rows is not None else _cached_rows()
    return next((r["value"] for r in rows if r["name"] == name), None)


def _cached_rows() -> list[dict]:
    path = Path(os.environ.get("DIMAP_FAST_CACHE", Path.home() / ".cache" / "dimap_fast")) / "static_report.json"
    if path.exists():
        return json.loads(path.read_text())["results"]
    rows = build()
    write_json(path, rows)
    return rows


def write_json(path: Path, rows: list[dict]) -> None:
    """Atomically: a reader never sees half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"estimate": True, "device": H100.name, "results": rows}, indent=1)
    write_text_atomic(path, body)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'row (all estimates, static model, H100)':<58} {'value':>10} {'unit':<7} {'target':<9} met"]
    for r in rows:
        v = "-" if r["value"] is None else f"{r['value']:.3f}"
        met = {True: "yes", False: "NO", None: ""}[r["met"]]
        lines.append(f"{r['name']:<58} {v:>10} {r['unit']:<7} {r['target'] or '':<9} {met}")
    targets = [r for r in rows if r["target"]]
    lines.append(f"{sum(r['met'] is True for r in targets)} of {len(targets)} targets met (estimates)")
    return "\n".join(lines)


def _dtype(name: str) -> torch.dtype:
    return DTYPES[name]
