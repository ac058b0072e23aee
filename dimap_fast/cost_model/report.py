"""The static report: one row per estimate, shaped like the GPU check's rows (name, value, unit,
target, met, note, source) plus "kind": "estimate"; every value is an estimate for an H100
(hardware.py), none measured. ``estimate_for`` maps the GPU check's row names onto these.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..atomic import write_text_atomic
from ..host import cache_dir
from . import masks_cost, worker
from .baselines import cublas_seconds, timm_attention_span
from .hardware import H100
from .kernel_cost import estimate
from .workloads import DTYPES, Attention, attention_workloads, sparse_workloads

_B1 = "attention.fwd.swin_b.s1.fp16"
_I21, _I22 = "issue 21", "issue 22"
TARGETS = {  # row -> (op, bound, unit, source): the Done-when lines of issues 21 and 22
    f"{_B1}.vs_floor": ("<=", 2.0, "x", _I21), f"{_B1}.vs_eager": (">=", 2.5, "x", _I21),
    f"{_B1}.vs_sdpa": (">=", 1.3, "x", _I21), f"{_B1}.spill": ("==", 0, "B", _I21),
    f"{_B1}.resident_blocks": (">=", 2, "blocks", _I21),
    "attention.fwd.swin_b.s1.w12_384.fp16.vs_floor": ("<=", 2.5, "x", _I21),
    "attention.fwd_bwd.swin_b.s1.fp16.vs_eager": (">=", 1.5, "x", _I21),
    "attention.fwd_bwd.swin_b.s1.fp16.fenced_atomics_in_loops": ("==", 0, "atomics", _I21),
    "sparse_linear.swin_b.s3_mlp.b64.t75.fp16.vs_cublas": (">=", 1.5, "x", _I21),
    "masks.swin_b.cuda": ("<=", 3.0, "ms", _I22),
}
_OPS = {"<=": float.__le__, ">=": float.__ge__, "==": float.__eq__}
CACHE = cache_dir() / "static_report.json"


def _row(name, value, unit, note=""):
    t = TARGETS.get(name)
    target = None if t is None else f"{t[0]} {t[1]:g}" + ("x" if t[2] == "x" else f" {t[2]}")
    met = None if t is None or value is None else _OPS[t[0]](float(value), float(t[1]))
    return dict(name=name, value=value, unit=unit, target=target, met=met, note=note,
                source=t[3] if t else None, kind="estimate")


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
    return (f"{e.name}: {e.programs} programs, {e.regs} regs, {e.shared // 1024} KiB shared, "
            f"{e.resident} blocks/SM, {e.waves} waves, spill {e.spill} B, {e.sass_per_program:.0f} "
            f"SASS/warp/program, {e.tensor_insns} MMA insns, {e.bytes / 1e6:.0f} MB"
            + (f" + {e.atomic_bytes / 1e6:.0f} MB of atomics into L2 (not priced)"
               if e.atomic_bytes else "") + "; memory "
            f"{e.memory_s * 1e3:.3f} ms, compute {e.compute_s * 1e3:.3f} ms (issue "
            f"{e.issue_s * 1e3:.3f}, latency {e.chain_s * 1e3:.3f}, tensor {e.tensor_s * 1e3:.3f}): "
            f"{e.bound}-bound, {e.no_overlap_seconds * 1e3:.3f} ms if nothing overlapped")


def _linears_seconds(w: Attention) -> float:
    """The block's qkv and proj Linears through cuBLAS, forward (and backward: dX and dW)."""
    side, c, _, _ = w.shape()
    m, dt = w.batch * side * side, DTYPES[w.dtype]
    fwd = cublas_seconds(m, c, 3 * c, dt) + cublas_seconds(m, c, c, dt)
    return 3 * fwd if w.backward else fwd


def attention_rows(c, est) -> list[dict]:
    w: Attention = c["workload"]
    kernel_s = sum(e.seconds for _, e in est)
    launcher_s = H100.memory_seconds(c["torch_bytes"]) + c["torch_ops"] * H100.launch_s
    span_s = kernel_s + launcher_s
    floor_s = H100.memory_seconds(w.floor_bytes())
    dt = DTYPES[w.dtype]
    eager = timm_attention_span(w.model, dt, False, w.backward, w.batch, w.image, w.window)
    sdpa = timm_attention_span(w.model, dt, True, w.backward, w.batch, w.image, w.window)
    lin = _linears_seconds(w)
    rows = [_row(f"{w.name}.kernel_ms", kernel_s * 1e3, "ms", "; ".join(_note(e) for _, e in est)),
            _row(f"{w.name}.floor_ms", floor_s * 1e3, "ms", f"{w.floor_bytes() / 1e6:.0f} MB once"),
            _row(f"{w.name}.vs_floor", kernel_s / floor_s, "x"),
            _row(f"{w.name}.vs_eager", eager.seconds / span_s, "x",
                 f"timm eager {eager.seconds * 1e3:.3f} ms ({eager.count} ops, {eager.bytes / 1e6:.0f} MB, "
                 f"a lower bound); ours {span_s * 1e3:.3f} ms incl. {c['torch_ops']} torch ops of the "
                 "launcher; span: qkv Linear's output to proj Linear's input"),
            _row(f"{w.name}.vs_sdpa", sdpa.seconds / span_s, "x",
                 f"timm SDPA {sdpa.seconds * 1e3:.3f} ms ({sdpa.count} ops, {sdpa.bytes / 1e6:.0f} MB, "
                 "a lower bound)"),
            _row(f"{w.name}.block_vs_eager", (eager.seconds + lin) / (span_s + lin), "x",
                 f"the GPU check's span: qkv and proj Linears included, {lin * 1e3:.3f} ms on each side"),
            _row(f"{w.name}.block_vs_sdpa", (sdpa.seconds + lin) / (span_s + lin), "x"),
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
        by_shape.setdefault(launch["replay"].footprint.get("x_ptr"), []).append(e)
    best = [min(es, key=lambda e: e.seconds) for es in by_shape.values()]
    ours = sum(e.seconds for e in best)
    dense = sum(cublas_seconds(m, k, n, DTYPES[w.dtype]) for m, k, n in w.shapes())
    return [_row(f"{w.name}.kernel_ms", ours * 1e3, "ms", "; ".join(_note(e) for e in best)),
            _row(f"{w.name}.cublas_ms", dense * 1e3, "ms",
                 f"dense at {H100.cublas_fraction:.0%} of the tensor peak, or its bytes"),
            _row(f"{w.name}.vs_cublas", dense / ours, "x")]


def masks_rows() -> list[dict]:
    jobs = [(m, width) for m in masks_cost.MODELS for width in masks_cost.WIDTHS[m]]
    runs = dict(zip(jobs, worker.call("masks", jobs)))
    specs = [(l["module"], l["kernel"], l["spec"]) for job in jobs for l in runs[job].launches]
    compiled = iter(worker.call("compile", specs))
    sass = {job: [next(compiled) for _ in runs[job].launches] for job in jobs}
    rows = []
    for m in masks_cost.MODELS:
        small, large = (runs[(m, w)] for w in masks_cost.WIDTHS[m])
        e = masks_cost.combine(m, small, large, sass[(m, masks_cost.WIDTHS[m][0])]
                               + sass[(m, masks_cost.WIDTHS[m][1])], H100)
        rows.append(_row(f"masks.{m}.cuda", e.seconds(H100) * 1e3, "ms",
                         f"plan(state dict).masks({masks_cost.RATIO}): {e.launches} Triton launches "
                         f"({e.kernel_s * 1e3:.3f} ms; slowest {e.slowest}) + {e.torch_ops} torch ops "
                         f"and torch.sort's {e.sort_launches} kernels ({e.sort_paths}; "
                         f"{e.sort_bytes / e.weights:.0f} B/weight), each {H100.launch_s * 1e6:.0f} us to "
                         f"launch; {e.syncs} host reads at {H100.sync_s * 1e6:.0f} us; "
                         f"{(e.torch_bytes + e.sort_bytes + e.kernel_bytes) / e.weights:.0f} "
                         f"B/weight moved; one read of the {e.weights / 1e6:.1f}M weights "
                         f"{e.floor_seconds(H100) * 1e3:.3f} ms"))
        rows.append(_row(f"masks.{m}.cuda.syncs", e.syncs, "reads"))
        rows.append(_row(f"masks.{m}.cuda.sort_ms", e.sort_seconds(H100) * 1e3, "ms",
                         f"the plan's torch.sort calls alone: {e.sort_launches} kernels, "
                         f"{e.sort_bytes / e.weights:.0f} B/weight ({e.sort_paths})"))
    return rows


def source_key() -> str:
    """What every row depends on: the package's and the kernels' sources and the versions of
    triton, torch and timm. A report built from the same key is the same report."""
    import hashlib

    import timm
    import torch
    import triton

    from .. import kernels

    h = hashlib.sha256(f"{triton.__version__} {torch.__version__} {timm.__version__}".encode())
    for root in (Path(__file__).parents[1], Path(kernels.__file__).parent):
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:32]


def cached_rows(key: str | None = None) -> list[dict] | None:
    """The last report built, if it was built from ``key`` (any key when None)."""
    try:
        data = json.loads(CACHE.read_text())
    except (OSError, ValueError):
        return None
    return data.get("results") if key is None or data.get("source_key") == key else None


def build(include_masks: bool = True, reuse: bool = True) -> list[dict]:
    """Every row; the whole report is kept in ``CACHE`` (for ``estimate_for``) and reused while
    the sources it was built from are unchanged."""
    key = source_key()
    if reuse and include_masks and (rows := cached_rows(key)) is not None:
        return rows
    workloads = attention_workloads() + sparse_workloads()
    rows = []
    for c, est in _kernels(worker.call("capture", workloads)):
        rows += attention_rows(c, est) if isinstance(c["workload"], Attention) else sparse_rows(c, est)
    rows += way_rows(rows)
    if include_masks:
        rows += masks_rows()
        write_json(CACHE, rows, key)
    return rows


# A setting's other way -> (its workloads' name part, the ratio row's suffix, the note): each
# workload made both ways gets the default way's block time over the other's (> 1: the other
# wins). Both sides have the same timm baseline, so the ratio of their block_vs_eager is it.
WAY_PAIRS = {
    "bias_sum": (".bias_sum", "bias_sum_vs_flush",
                 "the flush's atomics unpriced: a lower bound of the flush's time"),
    "kv_prefetch": (".kv_prefetch", "kv_prefetch_vs_off",
                    "copies waited on where a later block's DEPBAR waits; half the resident blocks "
                    "cost twice the waves (a program's chain overlaps nothing of its own)"),
}


def way_rows(rows: list[dict]) -> list[dict]:
    """``<default workload>.<suffix>`` for every workload the report made both ways of a setting."""
    value = {r["name"]: r["value"] for r in rows}
    out = []
    for part, suffix, note in WAY_PAIRS.values():
        for name, v in value.items():
            if f"{part}." in name and name.endswith(".block_vs_eager"):
                default = name.replace(part, "")
                if default in value:
                    base = default.removesuffix(".block_vs_eager")
                    out.append(_row(f"{base}.{suffix}", v / value[default], "x", note))
    return out


# The GPU check's rows (bench/gpu/) -> the row of this report that estimates the same
# quantity over the same span.
GPU_ROWS = {
    "speed.plan.swin_b": "masks.swin_b.cuda",
    "speed.plan.swin_t": "masks.swin_t.cuda",
    **{f"speed.plan.{m}.sort_ms": f"masks.{m}.cuda.sort_ms" for m in ("swin_t", "swin_b")},
    "speed.attn_memory_floor.swin_b.s1.fp16": f"{_B1}.vs_floor",
    **{f"speed.block_attn.{m}.s1.{d}.fused_vs_{b}": f"attention.fwd.{m}.s1.{d}.block_vs_{b}"
       for m in ("swin_t", "swin_b") for d in ("fp16", "fp32") for b in ("eager", "sdpa")},
    **{f"speed.attn_train.swin_b.s1.fp16.fused_vs_{b}": f"attention.fwd_bwd.swin_b.s1.fp16.block_vs_{b}"
       for b in ("eager", "sdpa")},
    **{f"speed.attn_train.swin_b384.s1.fp16.fused_vs_{b}":
       f"attention.fwd_bwd.swin_b.s1.w12_384.b32.fp16.block_vs_{b}" for b in ("eager", "sdpa")},
    "speed.attn_train.swin_b384.s1.fp16.bias_sum_vs_flush":
        "attention.fwd_bwd.swin_b.s1.w12_384.b32.fp16.bias_sum_vs_flush",
    "speed.attn.swin_b384.s1.fp16.kv_prefetch_vs_off": "attention.fwd.swin_b.s1.w12_384.fp16.kv_prefetch_vs_off",
    **{f"speed.linear.{g}.fp16.b64.t{t}": f"sparse_linear.swin_b.{g}.b64.t{t}.fp16.vs_cublas"
       for g in ("s1_mlp", "s3_mlp") for t in (50, 75, 90)},
}


def estimate_for(row_name: str, rows: list[dict] | None = None) -> float | None:
    """This model's estimate of a GPU-check row, None where it has none or no report was built
    (``dimap-fast bench --static`` builds one; this never compiles)."""
    name = GPU_ROWS.get(row_name)
    if name is None:
        return None
    rows = cached_rows() if rows is None else rows
    return next((r["value"] for r in rows or () if r["name"] == name), None)


def write_json(path: Path, rows: list[dict], key: str | None = None) -> None:
    """Atomically: a reader never sees half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"kind": "estimate", "device": H100.name, "constants": asdict(H100),
                       "source_key": key, "results": rows}, indent=1)
    write_text_atomic(path, body)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'row (ESTIMATES: static model of an H100, nothing measured)':<60} {'value':>10} "
             f"{'unit':<7} {'target':<10} met"]
    for r in rows:
        v = "-" if r["value"] is None else f"{r['value']:.3f}"
        met = {True: "yes", False: "NO", None: ""}[r["met"]]
        lines.append(f"{r['name']:<60} {v:>10} {r['unit']:<7} {r['target'] or '':<10} {met}")
    targets = [r for r in rows if r["target"]]
    lines.append(f"{sum(r['met'] is True for r in targets)} of {len(targets)} targets met (estimates)")
    return "\n".join(lines)
