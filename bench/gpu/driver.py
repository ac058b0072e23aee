"""Everything that needs a GPU, as one prepared command: ``make gpu-check``, which runs

    python bench/gpu_check.py [--out DIR] [--dry-run] [--wheels DIR] [--only STEP,...]

Steps, in order, each in its own subprocess under its own wall-clock budget (a crash, hang or
timeout is that step's failure; the next step still runs):

  tests     the GPU subset of the test suite (``pytest -m gpu tests``)
  kernels   every Triton kernel against its torch reference, float64, on real Swin shapes
  plan      CUDA plan masks against the numpy plan (swin_tiny, swin_base; ratios 0.35, 0.55)
  convert   a 50% block-pruned swin_tiny, converted to the block-sparse kernel, against timm's logits
  finetune  a short CUDA fine-tune of the shipped demo model through torchrun, then --resume
  speed     plan, fused window attention, block-sparse linear and whole models, timed

The clock starts when this process starts, and the whole run fits 8 minutes with 30 s to spare
(TOTAL_S): each step's budget is its work other than compiling plus the Triton compiles it needs
on a cold machine (empty Triton and inductor caches), counted with nothing run by
gpu.compiles; ``speed`` gets what the other selected steps leave and runs its targets
first (``--only speed`` gives it the whole run: on a cold machine, all speed rows need that
second run, COLD_RUNS). A step's timeout is its budget plus whatever
the steps before it left unused. Steps append their rows to a file as they measure them, so a
step that is killed keeps what it measured. Every target lives in TARGETS below, with the issue
it comes from; a target whose row is missing (step crashed, timed out or ran out of time) is
reported with value null, met false and note "missing": it is never met; a speed job that does
not fit what is left reports its rows missing with the reason.

Writes into DIR at most 8 files: report.json and report.md (both atomically, after every step;
each step's budget, planned and counted compiles), logs.tar.gz (every step's log) and the
speed step's plot (breakeven_gpu.png); prints one line per step as it starts and ends, then a
one-screen summary.

Exit code: 0 when every step ran to its end without an exception (targets may still be unmet:
the report says which); 1 when a step failed (a measurement raised), crashed, timed out or was
skipped for lack of time; 2 without a CUDA device (and no --dry-run) or with a --wheels that is
not a folder, with nothing written.

--dry-run: the same steps, rows and targets on tiny CPU shapes, Triton under TRITON_INTERPRET=1,
CUDA hidden from every step (so it also runs on a GPU machine); timings are meaningless. Default
--out for a dry run is a new temporary folder, never docs/gpu.

--only STEP,...: run just those steps (in the order above); only their targets are expected.

--wheels DIR (default .whl when it exists): wheels installed with ``pip --no-index --no-deps
--target`` into a temporary folder put first on the steps' PYTHONPATH (e.g. timm 1.0.x where the
machine's timm differs). No network is ever used.
"""

from __future__ import annotations

import os
import time


def _process_start() -> float:
    """When this process started: the lent machine's clock runs from there, not from our imports."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


STARTED = _process_start()

import argparse
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from .compiles import TESTS_WORKERS, compile_seconds, planned
from .report import archive_logs, print_summary, write_reports
from .processes import (child_env, cuda_available, environment, install_wheels, read_rows,
                           run_step_process)


# ---- targets: one table. A row named here is expected; missing, it is never met. ----

@dataclass(frozen=True)
class Target:
    name: str
    op: str  # "<=", ">=", "==", ">"
    bound: float
    unit: str
    source: str  # the issue (or the check) the target comes from
    when: str = "both"  # "real", "dry" or "both": in which kind of run the row is expected

    @property
    def text(self) -> str:
        b = f"{self.bound:g}"
        return f"{self.op} {b}x" if self.unit == "x" else f"{self.op} {b}" + (" ms" if self.unit == "ms" else "")


# Kernel tolerance: ||out - ref||_2 / ||ref||_2 against float64; fp32 split by matmul precision.
KERNEL_TOL = {"fp32_ieee": 1e-5, "fp32_tf32": 5e-3, "fp16": 5e-3, "bf16": 3e-2}
WATTN_GROUPS = ("swin_ts_224", "swin_b_224", "swin_ts_384", "swin_b_384", "padded")
ATTN_STAGES = ("swin_t.s1", "swin_t.s3", "swin_b.s1", "swin_b.s3")
LINEAR_GROUPS = ("s1_mlp", "s1_attn", "s3_mlp", "s3_attn")
REL = "rel. L2 err"
CHK = "gpu check (correctness)"

TARGETS = [
    Target("tests.failed", "==", 0, "tests", "GPU subset of the test suite", "real"),
    Target("tests.skipped", "==", 0, "tests", "GPU subset: a skip is a check that did not run (issue 20)", "real"),
    Target("tests.not_passed", "==", 0, "tests", "GPU subset: passed == collected (issue 20)", "real"),
    Target("tests.collected", ">", 0, "tests", "GPU subset of the test suite (dry run: collected)", "dry"),
    *[Target(f"kernels.window_attention.{g}.{d}", "<=", tol, REL, CHK)
      for g in WATTN_GROUPS for d, tol in KERNEL_TOL.items()],
    *[Target(f"kernels.block_sparse_linear.swin_b.{d}", "<=", tol, REL, CHK) for d, tol in KERNEL_TOL.items()],
    *[t for d in ("fp32", "fp16") for t in (
        Target(f"kernels.module_scores.ragged.{d}", "<=", 1e-12, "max rel err", CHK),
        Target(f"kernels.select_keep_counts.ragged.{d}", "==", 0, "counts differing", CHK),
        Target(f"kernels.apply_cutoffs.ragged.{d}", "==", 0, "entries differing", CHK))],
    *[Target(f"plan.{m}.r{r}", "==", 0, "mask entries differing", CHK)
      for m in ("swin_t", "swin_b") for r in ("0.35", "0.55")],
    Target("convert.swin_t.fp32_ieee", "<=", 1e-4, "max abs err / max |logit|", CHK),
    Target("convert.swin_t.fp32_tf32", "<=", 1e-2, "max abs err / max |logit|", CHK),
    Target("convert.swin_t.fp16", "<=", 1e-2, "max abs err / max |logit|", CHK),
    Target("finetune.first_exit", "==", 0, "exit code", CHK),
    Target("finetune.resume_exit", "==", 0, "exit code", CHK),
    Target("finetune.pruned_nonzero", "==", 0, "weights", CHK),
    Target("finetune.last_epoch", "==", 2, "epoch", CHK),
    Target("speed.plan.swin_b", "<=", 3, "ms", "issue 4"),
    # SwinTransformerBlock._attn scope: qkv Linear + attention + proj, from the normed token map.
    *[Target(f"speed.block_attn.{s}.fp16.fused_vs_eager", ">=", 3.5 if s == "swin_b.s1" else 2.5, "x",
             "issues 5, 13" if s == "swin_b.s1" else "issue 5") for s in ATTN_STAGES],
    Target("speed.block_attn.swin_b.s1.fp16.fused_vs_sdpa", ">=", 1.5, "x", "issue 13"),
    Target("speed.attn_memory_floor.swin_b.s1.fp16", "<=", 2.0, "x", "issue 13 (time / memory floor)"),
    Target("speed.attn_train.swin_b.s1.fp16.fused_vs_eager", ">=", 2.0, "x", "issue 13"),
    Target("speed.v2_attn.swinv2_b.s1.fp16.fused_vs_eager", ">=", 5.0, "x", "issue 13"),
    # whole models: over the same model on timm's SDPA path (issue 20); the .vs_eager rows are info
    Target("speed.model_attn.swin_b.fp16", ">=", 1.25, "x", "issue 13, over timm SDPA (issue 20)"),
    Target("speed.train.swin_b.fp16", ">=", 1.15, "x", "issue 13, over timm SDPA (issue 20)"),
    Target("speed.train_memory.swin_b.fp16", ">", 1.0, "x", "issue 13 (timm SDPA's peak / ours)"),
    Target("speed.linear.s1_mlp.fp16.b64.t75", ">=", 1.5, "x", "issue 14"),
    Target("speed.linear.s3_mlp.fp16.b64.t75", ">=", 1.5, "x", "issue 14"),
    Target("speed.model.swin_b.fp16", ">=", 1.4, "x", "issues 5, 14, over timm SDPA (issue 20)"),
    *[Target(f"speed.model.{m}", ">=", 1.0, "x", "issue 14, over timm SDPA (issue 20)")
      for m in ("swin_t.fp16", "swin_t.fp32", "swin_b.fp32")],
    # issue 14's end-to-end rows (bench/end_to_end.py's models, fp16, batch 128, over dense on SDPA)
    Target("speed.e2e.swin_b.fp16.shrunk50", ">=", 1.7, "x", "issue 14 (shrunk at 50% FLOPs reduction)"),
    *[Target(f"speed.e2e.{m}.fp16.block{r}", ">=", 1.0, "x", "issue 14 (converted never slower than dense)")
      for m in ("swin_b", "swin_t") for r in (50, 75)],
]

STEPS = ("tests", "kernels", "plan", "convert", "finetune", "speed")
# Budgets, from the process start: 8 minutes less 30 s of slack. A step's budget is its work
# other than compiling (BASE_S, estimates) plus its counted compiles (gpu.compiles) at
# PARALLEL at a time; ``speed`` gets what the selected steps leave, and runs its targets first.
TOTAL_S = 450
STARTUP_S = 15  # estimate: interpreter, wheels and the environment probe before the first step
BASE_S = {"tests": 40, "kernels": 25, "plan": 20, "convert": 20, "finetune": 40}
PARALLEL = {"tests": TESTS_WORKERS, "kernels": 4, "plan": 1, "convert": 1, "finetune": 1, "speed": 1}
DRY_BUDGET_S = {"tests": 60, "kernels": 90, "plan": 60, "convert": 40, "finetune": 60, "speed": 90}  # a loaded 2-core host


SPEED_MIN_S = 30  # speed's timing beyond its compiles, for its first targets
# On a cold machine every step fits one run except speed beside the others: two runs, each its
# own 8 minutes (the order gpu.speed keeps: targets first, info jobs while time is left).
COLD_RUNS = (("tests", "kernels", "plan", "convert", "finetune"), ("speed",))


def budgets(steps=STEPS) -> dict[str, int]:
    """Seconds per selected step on a cold machine (see TOTAL_S)."""
    out = {s: math.ceil(BASE_S[s] + compile_seconds(s, PARALLEL[s])) for s in steps if s in BASE_S}
    if "speed" in steps:
        out["speed"] = TOTAL_S - STARTUP_S - sum(out.values())
    return {s: out[s] for s in steps}


def speed_fits(steps=STEPS) -> bool:
    """Whether speed's share of this selection covers its compiles and SPEED_MIN_S of timing."""
    return "speed" not in steps or budgets(steps)["speed"] >= compile_seconds("speed") + SPEED_MIN_S


BUDGET_S = budgets()


def expected_targets(dry_run: bool, steps=STEPS) -> dict[str, Target]:
    """The targets a run of ``steps`` must report, by row name."""
    kind = "dry" if dry_run else "real"
    return {t.name: t for t in TARGETS if t.when in ("both", kind) and t.name.split(".")[0] in steps}


_OPS = {"<=": lambda v, b: v <= b, ">=": lambda v, b: v >= b, "==": lambda v, b: v == b,
        ">": lambda v, b: v > b}


def judge(value, target: Target, error=None) -> bool:
    """Whether ``value`` meets ``target``: a NaN, an infinity, an error or no value never does."""
    if error or value is None:
        return False
    try:
        v = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and _OPS[target.op](v, target.bound)


def merge_rows(measured: list[dict], targets: dict[str, Target], step_errors: dict[str, str] | None = None,
               steps=STEPS, shown: dict[str, Target] | None = None) -> list[dict]:
    """The report's rows: each step's target rows in table order (a missing one with value None,
    met False, note "missing" and its step's error), then the ``shown`` targets (a real run's,
    in a dry run: named with met None), then its other rows as they came."""
    step_errors = step_errors or {}
    by_name = {}
    for row in measured:
        row = _clean(row)
        by_name[row["name"]] = row  # a rerun of a row replaces it
    for name in (n for row in measured for n in row.get("planned", ())):  # a planned row never vanishes
        if name not in by_name and name not in targets:
            step = name.split(".")[0]
            by_name[name] = {"name": name, "value": None, "unit": "", "note": "missing",
                             "error": step_errors.get(step) or "not measured (the step ended first)"}
    out = []
    for step in steps:
        for t in (t for t in targets.values() if t.name.split(".")[0] == step):
            row = by_name.pop(t.name, None)
            if row is None:
                row = {"name": t.name, "value": None, "unit": t.unit, "note": "missing"}
                if step_errors.get(step):
                    row["error"] = step_errors[step]
            row.update(target=t.text, met=judge(row["value"], t, row.get("error")), source=t.source)
            out.append(_ordered(row, step))
        for t in (t for t in (shown or {}).values() if t.name.split(".")[0] == step and t.name not in targets):
            by_name.pop(t.name, None)
            out.append(_ordered({"name": t.name, "value": None, "unit": t.unit, "target": t.text, "met": None,
                                 "note": "a real run's target: judged on a GPU", "source": t.source}, step))
        for name in [n for n in by_name if n.split(".")[0] == step]:
            row = by_name.pop(name)
            row.update(target=None, met=None)
            out.append(_ordered(row, step))
    for row in by_name.values():  # rows of no known step
        row.update(target=None, met=None)
        out.append(_ordered(row, row["name"].split(".")[0]))
    return out


def _clean(row: dict) -> dict:
    row = {k: v for k, v in row.items() if v is not None or k == "value"}
    row.setdefault("value", None)
    row.setdefault("unit", "")
    v = row["value"]
    if isinstance(v, float) and not math.isfinite(v):
        row["value"] = None
        row["note"] = "; ".join(filter(None, [row.get("note"), f"value was {v}"]))
    return row


def _ordered(row: dict, step: str) -> dict:
    head = {k: row.get(k) for k in ("name", "value", "unit", "target", "met")}
    return {**head, "step": step, **{k: v for k, v in row.items() if k not in head and k != "step"}}


def run(args) -> int:
    dry = args.dry_run
    steps = STEPS if not args.only else tuple(s for s in STEPS if s in args.only)
    if args.wheels and not Path(args.wheels).is_dir():
        print(f"gpu_check: --wheels {args.wheels} is not a folder: name the folder that holds the .whl files",
              file=sys.stderr)
        return 2
    if not dry and not cuda_available():
        print("gpu_check: no CUDA device is present: use --dry-run (tiny CPU shapes, Triton interpreter) "
              "or run this on a GPU machine", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (ROOT / "docs" / "gpu" if not dry else
                                           Path(tempfile.mkdtemp(prefix="gpu_check_dry_")))
    out.mkdir(parents=True, exist_ok=True)
    started = STARTED
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        (tmp / "logs").mkdir()
        wheels, wheel_error, wheel_dir = [], None, None
        folder = Path(args.wheels) if args.wheels else ROOT / ".whl"
        if folder.is_dir():
            wheels, wheel_error = install_wheels(folder, tmp / "wheels")
            wheel_dir = str(tmp / "wheels") if wheels and not wheel_error else None
            print(f"gpu_check: wheels from {folder}: {', '.join(wheels) or 'none needed (versions installed)'}"
                  + (f": NOT installed ({wheel_error})" if wheel_error else ""), flush=True)
        env = child_env(dry, wheel_dir)
        report = {**environment(dry, wheel_dir), "dry_run": dry,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
                  "seconds": 0.0, "steps": [], "results": [], "wheels": wheels, "wheel_error": wheel_error}
        print(f"gpu_check: {'DRY RUN (CPU interpreter, timings meaningless)' if dry else report['card']}, "
              f"torch {report['torch']}, triton {report['triton']}, timm {report['timm']} -> {out}", flush=True)
        cold = budgets(steps)
        if not dry and not speed_fits(steps):
            print(f"gpu_check: speed gets {cold['speed']} s here, under its ~{compile_seconds('speed'):.0f} s of "
                  f"compiles on a cold machine plus {SPEED_MIN_S} s: its rows past that are reported missing; "
                  f"for all of them run --only {','.join(COLD_RUNS[0])}, then --only speed", flush=True)
        allowed = {s: DRY_BUDGET_S[s] for s in steps} if dry else cold
        deadline = started + (0 if dry else STARTUP_S) + sum(allowed.values())
        measured, errors = [], {}
        for i, step in enumerate(steps):
            timeout = deadline - time.time() - sum(allowed[s] for s in steps[i + 1:])
            t0 = time.time()
            if timeout < 10:
                status, error = "skipped", "no time left in the run's budget"
            else:
                print(f"[{step}] start (timeout {timeout:.0f} s)", flush=True)
                rows_file = tmp / f"{step}.jsonl"
                status, error = run_step_process(step, rows_file, tmp / "logs" / f"{step}.log", env, timeout, dry,
                                                 tmp)
                measured += read_rows(rows_file)
            secs = round(time.time() - t0, 1)
            if error:
                errors[step] = error
            report["steps"].append({"name": step, "status": status, "seconds": secs, "error": error,
                                    **_compile_plan(step, cold[step], measured)})
            print(f"[{step}] {status} in {secs:.1f} s" + (f": {error}" if error else ""), flush=True)
            report["results"] = merge_rows(measured, expected_targets(dry, steps), errors, steps,
                                           expected_targets(False, steps) if dry else None)
            report["seconds"] = round(time.time() - started, 1)
            archive_logs(out, tmp / "logs")
            write_reports(out, report)
    print_summary(report, out)
    return 0 if all(s["status"] == "ok" for s in report["steps"]) else 1


def _compile_plan(step: str, budget: int, measured: list[dict]) -> dict:
    """The step's cold-machine budget beside the compiles counted for it: planned (with nothing
    run) and, in a real run, counted by triton's hook in the step's processes."""
    counted = [r["value"] for r in measured if r["name"] == f"{step}.compiles" or
               r["name"].startswith(f"{step}.compiles.")]
    counted = [v for v in counted if isinstance(v, int)]
    return {"budget_s": budget, "compiles_planned": planned(step),
            "compile_s_estimate": round(compile_seconds(step, PARALLEL[step]), 1),
            "compiles_counted": sum(counted) if counted else None}


# ---- command line ----

def _steps_list(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in STEPS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown step(s) {', '.join(bad) or text!r}: choose from {', '.join(STEPS)}")
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="report folder (default docs/gpu; a new temporary folder with --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="tiny CPU shapes under TRITON_INTERPRET=1")
    p.add_argument("--wheels", help="folder of wheels to put first on the steps' path (default .whl if present)")
    p.add_argument("--only", type=_steps_list, help=f"comma-separated steps among {','.join(STEPS)}")
    # A step's own process (started by the driver):
    p.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--parts", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step:
        from .steps import run_step

        return run_step(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
