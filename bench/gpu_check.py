"""Everything that needs a GPU, as one prepared command: ``python bench/gpu_check.py``.

    python bench/gpu_check.py [--out DIR] [--dry-run] [--wheels DIR] [--only STEP,...]

Steps, in order, each in its own subprocess under its own wall-clock budget (a crash, hang or
timeout is that step's failure; the next step still runs):

  tests     the GPU subset of the test suite (``pytest -m gpu tests``)
  kernels   every Triton kernel against its torch reference, float64, on real Swin shapes
  plan      CUDA plan masks against the numpy plan (swin_tiny, swin_base; ratios 0.35, 0.55)
  convert   a 50% block-pruned swin_tiny, converted, against timm's logits
  finetune  a short CUDA fine-tune of the shipped demo model through torchrun, then --resume
  speed     plan, fused window attention, block-sparse linear and whole models, timed

A step's timeout is its budget plus whatever the steps before it left unused (the budgets sum
to 7.5 minutes). Steps append their rows to a file as they measure them, so a step that is killed
keeps what it measured. Every target lives in TARGETS below, with the issue it comes from; a
target whose row is missing (step crashed, timed out or ran out of time) is reported with value
null, met false and note "missing": it is never met.

Writes DIR/report.json, DIR/report.md (both atomically, after every step) and DIR/logs/STEP.log;
prints one line per step as it starts and ends, then a one-screen summary.

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

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "bench") not in sys.path:  # also when imported by path (tests): its helpers sit beside it
    sys.path.append(str(ROOT / "bench"))

from gpu_check_report import print_summary, write_reports  # noqa: E402


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
    Target("speed.model_attn.swin_b.fp16", ">=", 1.25, "x", "issue 13"),
    Target("speed.train.swin_b.fp16", ">=", 1.15, "x", "issue 13"),
    Target("speed.train_memory.swin_b.fp16", ">", 1.0, "x", "issue 13 (timm's peak / ours)"),
    Target("speed.linear.s1_mlp.fp16.b64.t75", ">=", 1.5, "x", "issue 14"),
    Target("speed.linear.s3_mlp.fp16.b64.t75", ">=", 1.5, "x", "issue 14"),
    Target("speed.model.swin_b.fp16", ">=", 1.4, "x", "issues 5, 14"),
    *[Target(f"speed.model.{m}", ">=", 1.0, "x", "issue 14") for m in ("swin_t.fp16", "swin_t.fp32", "swin_b.fp32")],
    # issue 14's end-to-end rows (bench/end_to_end.py's models, fp16, batch 128, over dense on SDPA)
    Target("speed.e2e.swin_b.fp16.shrunk50", ">=", 1.7, "x", "issue 14 (shrunk at 50% FLOPs reduction)"),
    *[Target(f"speed.e2e.{m}.fp16.block{r}", ">=", 1.0, "x", "issue 14 (converted never slower than dense)")
      for m in ("swin_b", "swin_t") for r in (50, 75)],
]

STEPS = ("tests", "kernels", "plan", "convert", "finetune", "speed")
BUDGET_S = {"tests": 105, "kernels": 80, "plan": 30, "convert": 45, "finetune": 30, "speed": 160}  # 450 s
DRY_BUDGET_S = {"tests": 40, "kernels": 90, "plan": 40, "convert": 40, "finetune": 60, "speed": 90}
KILL_GRACE_S = 5


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
               steps=STEPS) -> list[dict]:
    """The report's rows: each step's target rows in table order (a missing one with value None,
    met False, note "missing" and its step's error), then its other rows as they came."""
    step_errors = step_errors or {}
    by_name = {}
    for row in measured:
        row = _clean(row)
        by_name[row["name"]] = row  # a rerun of a row replaces it
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


# ---- running the steps ----

def _child_env(dry_run: bool, wheel_dir: str | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry_run:
        env["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU only, also on a GPU machine
    else:
        env.pop("TRITON_INTERPRET", None)
    if wheel_dir:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [wheel_dir, env.get("PYTHONPATH")]))
    return env


def _install_wheels(folder: Path, target: Path) -> tuple[list[str], str | None]:
    """Install the folder's wheels into ``target``, skipping any whose version is installed
    already; returns (what was installed, error)."""
    import importlib.metadata as md

    wheels = []
    for w in sorted(folder.glob("*.whl")):
        name, version = (w.name.split("-") + ["", ""])[:2]
        try:
            have = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            have = None
        if have != version:
            wheels.append(w)
    if not wheels:
        return [], None
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
           *map(str, wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return [w.name for w in wheels], _last_line(done.stderr + done.stdout) or f"pip exit {done.returncode}"
    return [w.name for w in wheels], None


def _last_line(text: str) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[-1][:300] if lines else ""


def _run_step(name: str, rows_file: Path, log_file: Path, env: dict, timeout: float, dry_run: bool,
              work: Path) -> tuple[str, str | None]:
    """Run one step in its own process group; returns (status, error)."""
    deadline = time.time() + timeout - KILL_GRACE_S
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--rows", str(rows_file),
           "--work", str(work), "--deadline", f"{deadline:.1f}"] + (["--dry-run"] if dry_run else [])
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return "timeout", f"timed out after {timeout:.0f} s"
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything the step left running must not overlap the next
        except ProcessLookupError:
            pass
    if rc == 0:
        return "ok", None
    raised = [r for r in _read_rows(rows_file) if r.get("error")]
    if rc == 1 and raised:
        return "failed", f"{len(raised)} row(s) raised; {raised[0]['name']}: {raised[0]['error']}"[:300]
    text = log_file.read_text(errors="replace")
    errors = [l for l in text.splitlines() if "Error" in l or "error" in l]
    return ("failed" if rc == 1 else "crashed"), f"exit {rc}: {_last_line(errors[-1] if errors else text)}"[:300]


def _kill_group(proc: subprocess.Popen) -> None:
    # The step's process group, which this driver created: also ends pytest's or torchrun's children.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        if sig == signal.SIGTERM:
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
    proc.wait()


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(row, dict) and "name" in row:
            rows.append(row)
    return rows


def _environment(dry_run: bool, wheel_dir: str | None) -> dict:
    import importlib.metadata as md

    if wheel_dir:
        sys.path.insert(0, wheel_dir)  # versions as the steps see them

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    card = driver = None
    if not dry_run:
        import torch

        card = torch.cuda.get_device_name()
        if shutil.which("nvidia-smi"):
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True)
            driver = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
    return {"card": card or "none (dry run, CPU interpreter)", "driver": driver, "torch": version("torch"),
            "triton": version("triton"), "timm": version("timm")}


def _cuda_available() -> bool:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch

        return torch.cuda.is_available()


def run(args) -> int:
    dry = args.dry_run
    steps = STEPS if not args.only else tuple(s for s in STEPS if s in args.only)
    if args.wheels and not Path(args.wheels).is_dir():
        print(f"gpu_check: --wheels {args.wheels} is not a folder: name the folder that holds the .whl files",
              file=sys.stderr)
        return 2
    if not dry and not _cuda_available():
        print("gpu_check: no CUDA device is present: use --dry-run (tiny CPU shapes, Triton interpreter) "
              "or run this on a GPU machine", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (ROOT / "docs" / "gpu" if not dry else
                                           Path(tempfile.mkdtemp(prefix="gpu_check_dry_")))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        wheels, wheel_error, wheel_dir = [], None, None
        folder = Path(args.wheels) if args.wheels else ROOT / ".whl"
        if folder.is_dir():
            wheels, wheel_error = _install_wheels(folder, tmp / "wheels")
            wheel_dir = str(tmp / "wheels") if wheels and not wheel_error else None
            print(f"gpu_check: wheels from {folder}: {', '.join(wheels) or 'none needed (versions installed)'}"
                  + (f": NOT installed ({wheel_error})" if wheel_error else ""), flush=True)
        env = _child_env(dry, wheel_dir)
        report = {**_environment(dry, wheel_dir), "dry_run": dry,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
                  "seconds": 0.0, "steps": [], "results": [], "wheels": wheels, "wheel_error": wheel_error}
        print(f"gpu_check: {'DRY RUN (CPU interpreter, timings meaningless)' if dry else report['card']}, "
              f"torch {report['torch']}, triton {report['triton']}, timm {report['timm']} -> {out}", flush=True)
        budgets = DRY_BUDGET_S if dry else BUDGET_S
        deadline = started + sum(budgets[s] for s in steps)
        measured, errors = [], {}
        for i, step in enumerate(steps):
            timeout = deadline - time.time() - sum(budgets[s] for s in steps[i + 1:])
            t0 = time.time()
            if timeout < 10:
                status, error = "skipped", "no time left in the run's budget"
            else:
                print(f"[{step}] start (timeout {timeout:.0f} s)", flush=True)
                rows_file = tmp / f"{step}.jsonl"
                status, error = _run_step(step, rows_file, out / "logs" / f"{step}.log", env, timeout, dry,
                                          tmp)
                measured += _read_rows(rows_file)
            secs = round(time.time() - t0, 1)
            if error:
                errors[step] = error
            report["steps"].append({"name": step, "status": status, "seconds": secs, "error": error})
            print(f"[{step}] {status} in {secs:.1f} s" + (f": {error}" if error else ""), flush=True)
            report["results"] = merge_rows(measured, expected_targets(dry, steps), errors, steps)
            report["seconds"] = round(time.time() - started, 1)
            write_reports(out, report)
    print_summary(report, out)
    return 0 if all(s["status"] == "ok" for s in report["steps"]) else 1


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
        from gpu_check_steps import run_step

        return run_step(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
