"""What every gpu_check step shares (rows, deadline, dispatch) and the end-to-end checks:
tests, plan, convert, finetune. The kernel checks and the timings have files of their own.

A step runs in its own process (``python -m gpu --step NAME``); under --dry-run the driver has set
TRITON_INTERPRET=1 and hidden CUDA before anything here imports torch or triton.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from .context import Ctx, Rows
from .models import block_prune_, small_swin, timm_swin_model, tiny_state

ROOT = Path(__file__).resolve().parents[2]


def run_step(args) -> int:
    """Entry point of a step's process: 0 all rows measured, 1 a row raised, 3 the step crashed."""
    ctx = Ctx(bool(args.dry_run), args.deadline or time.time() + 600, Path(args.work or "."), args.parts)
    rows = Rows(args.rows)
    if args.step == "kernels":
        from .kernel_checks import step_kernels as fn
    elif args.step == "speed":
        from .speed import step_speed as fn
    else:
        fn = {"tests": step_tests, "plan": step_plan, "convert": step_convert, "finetune": step_finetune}[args.step]
    print(f"step {args.step}{' (dry run)' if ctx.dry else ''}, {ctx.left():.0f} s", flush=True)
    from .compiles import count_compiles

    compiles = count_compiles()
    try:
        fn(rows, ctx)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 3
    finally:
        if compiles() is not None and not (args.step == "kernels" and ctx.parts is None):
            rows.add(f"{args.step}.compiles" + (f".{ctx.parts}" if ctx.parts else ""), compiles(), "compiles",
                     "triton compiles in this process (its jit_cache_hook)")
    return 1 if rows.failed else 0


def run_bounded(cmd, timeout: float, **kw) -> tuple[int | None, str]:
    """(exit code or None on timeout, stdout + stderr) of ``cmd``, in a process group of its own;
    past the timeout the whole group (torchrun and its workers, pytest and its xdist workers) gets
    SIGTERM, then SIGKILL."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out + err
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            out, err = proc.communicate()
        _signal_group(proc, signal.SIGKILL)  # a worker that outlived its launcher
        return None, (out or "") + (err or "")


def _signal_group(proc, sig) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


# ---- tests: the GPU subset of the test suite ----

_PROGRESS = re.compile(r"^([.FEsxX]+)\s*(\[\s*\d+%\])?$")


def step_tests(rows: Rows, ctx: Ctx) -> None:
    """The GPU subset: none may fail or skip, and every collected test passes (a test that
    skips on a GPU host is a check that did not run)."""
    from .compiles import TESTS_WORKERS

    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    if ctx.dry:  # the interpreter run of these tests is part of `make test` already
        cmd.insert(3, "--collect-only")
    else:
        cmd.insert(3, "--durations=15")  # in the log: what to trim if this step outgrows its budget
        if importlib.util.find_spec("xdist") is not None:
            # Triton compiles each kernel variant on first use, one at a time per process: spread
            # the tests over the GPU machine's cores (they share the one GPU).
            cmd[3:3] = ["-n", str(TESTS_WORKERS)]
    timeout = max(10.0, ctx.left() - 3)
    t0 = time.time()
    rc, out = run_bounded(cmd, timeout, cwd=ROOT)
    late = rc is None
    print("\n".join(out.splitlines()[-60:]), flush=True)
    if ctx.dry:
        m = re.search(r"(\d+)(?:/\d+)? tests? collected", out)
        with rows.row("tests.collected", "tests") as c:
            if rc not in (0, 5) or m is None and "no tests collected" not in out:
                raise RuntimeError(f"pytest --collect-only exit {rc}: {_tail(out)}")
            c.value = int(m.group(1)) if m else 0
            c.note = f"pytest --collect-only -m gpu, {time.time() - t0:.0f} s"
        return
    summary = [l for l in out.splitlines() if re.search(r"\b(passed|failed|errors?|skipped|no tests ran)\b", l)
               and re.search(r" in [\d.]+s", l)]
    items = re.search(r"\[(\d+) items?\]", out)  # xdist's "N workers [M items]"
    if late:
        prog = "".join(m.group(1) for m in map(_PROGRESS.match, out.splitlines()) if m)
        why = f"pytest timed out after {timeout:.0f} s"
        rows.add("tests.failed", prog.count("F") + prog.count("E"), "tests",
                 f"{prog.count('.')} passed before the timeout", why)
        for name in ("tests.skipped", "tests.not_passed"):
            rows.add(name, None, "tests", "missing: the run did not finish", why)
        rows.failed = True
        return
    counts = {k: 0 for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "deselected")}
    for n, kind in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)",
                              summary[-1] if summary else ""):
        counts[kind.rstrip("s") if kind.startswith("error") else kind] += int(n)
    failed_names = [l.split()[1] for l in out.splitlines() if l.startswith(("FAILED ", "ERROR "))][:5]
    skipped_why = [l for l in out.splitlines() if l.startswith("SKIPPED ")][:3]
    ran = sum(v for k, v in counts.items() if k != "deselected")
    collected = int(items.group(1)) if items else ran
    with rows.row("tests.failed", "tests") as c:
        if rc not in (0, 1):
            raise RuntimeError(f"pytest exit {rc}: {_tail(out)}")
        c.value = counts["failed"] + counts["error"]
        c.note = (f"{counts['passed']} passed, {counts['skipped']} skipped, {time.time() - t0:.0f} s"
                  + (f"; failed: {', '.join(failed_names)}" if failed_names else ""))
    rows.add("tests.skipped", counts["skipped"], "tests", "; ".join(skipped_why) or None)
    rows.add("tests.collected", collected, "tests", "selected by -m gpu" + ("" if items else " (sum of outcomes)"))
    rows.add("tests.passed", counts["passed"], "tests")
    rows.add("tests.not_passed", collected - counts["passed"], "tests", "collected less passed")


def _tail(text: str) -> str:
    lines = [l for l in text.splitlines() if l.strip()]
    return lines[-1][:200] if lines else "(no output)"


# ---- plan: CUDA masks against the numpy plan ----

def step_plan(rows: Rows, ctx: Ctx) -> None:
    import torch

    import dimap_fast

    if ctx.dry:  # small Swin-named state dicts; the Triton path runs under the interpreter
        models = {"swin_t": lambda: tiny_state(0), "swin_b": lambda: tiny_state(1)}
    else:
        models = {"swin_t": lambda: timm_swin_model("swin_tiny_patch4_window7_224").state_dict(),
                  "swin_b": lambda: timm_swin_model("swin_base_patch4_window7_224").state_dict()}
    for short, make in models.items():
        plans = {}
        for r in ("0.35", "0.55"):
            with rows.row(f"plan.{short}.r{r}", "mask entries differing") as c:
                if not plans:
                    sd = make()
                    if ctx.dry:
                        plans["dev"] = dimap_fast.plan(sd, backend="triton")
                    else:
                        plans["dev"] = dimap_fast.plan({k: v.cuda() for k, v in sd.items()})
                        if plans["dev"].backend != "triton":
                            raise RuntimeError(f"plan chose backend {plans['dev'].backend!r} for CUDA weights")
                    plans["cpu"] = dimap_fast.plan(sd, backend="numpy")
                a, b = plans["dev"].masks(float(r)), plans["cpu"].masks(float(r))
                if set(a) != set(b):
                    raise RuntimeError(f"mask names differ: {sorted(set(a) ^ set(b))[:3]}")
                c.value = sum(int((a[k].cpu() != b[k]).sum()) for k in b)
                total = sum(m.numel() for m in b.values())
                kept = sum(int(m.sum()) for m in b.values())
                c.note = (f"{len(b)} layers, {total} weights, {1 - kept / total:.1%} removed; "
                          f"{plans['dev'].backend} on {next(iter(a.values())).device}")
        del plans
        if not ctx.dry:
            torch.cuda.empty_cache()


# ---- convert: a block-pruned swin_tiny through dimap_fast.nn against timm ----

def step_convert(rows: Rows, ctx: Ctx) -> None:
    import torch

    import dimap_fast.nn as dnn

    if ctx.dry:
        model, block, dev = block_prune_(small_swin(16), 0.5, 16), 16, "cpu"
        x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    else:
        from .compiles import CONVERT_BATCH

        model, block, dev = block_prune_(timm_swin_model("swin_tiny_patch4_window7_224"), 0.5, 32), 32, "cuda"
        x = torch.randn(CONVERT_BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.set_float32_matmul_precision("highest")
        ref32 = copy.deepcopy(model).to(dev)(x.to(dev)).double()
    for variant, dtype, precision in (("fp32_ieee", torch.float32, "highest"), ("fp32_tf32", torch.float32, "high"),
                                      ("fp16", torch.float16, "highest")):
        with rows.row(f"convert.swin_t.{variant}", "max abs err / max |logit|") as c:
            torch.set_float32_matmul_precision(precision)
            dense = copy.deepcopy(model).to(dev, dtype)
            # the kernel is what this checks: convert's measured per-layer choice could keep F.linear
            conv = dnn.convert(copy.deepcopy(dense), block=block, choose="kernel")
            n_sparse = sum(isinstance(m, dnn.SparseLinear) for m in conv.modules())
            n_blocks = sum(isinstance(m, dnn.SwinBlock) for m in conv.modules())
            if n_sparse == 0:
                raise RuntimeError("convert(choose='kernel') made no SparseLinear: the kernel was not checked")
            with torch.inference_mode(), dnn.backend("triton"):  # the kernels, never a silent torch path
                want = dense(x.to(dev, dtype)).double()
                got = conv(x.to(dev, dtype)).double()
            scale = float(want.abs().max())
            c.value = float((got - want).abs().max()) / scale if bool(torch.isfinite(got).all()) else float("nan")
            own = float((want - ref32).abs().max()) / float(ref32.abs().max())
            c.note = (f"{n_sparse} SparseLinear (block {block} tiles zeroed), {n_blocks} SwinBlock; "
                      f"timm itself in this dtype vs fp32 highest: {own:.2e}")
            del dense, conv
    torch.set_float32_matmul_precision("highest")


# ---- finetune: torchrun, one process, stop after epoch 1, resume ----

def step_finetune(rows: Rows, ctx: Ctx) -> None:
    import torch

    from dimap_fast.train import MODEL_FILE, STATE_FILE, load_train_state
    from dimap_fast.io.checkpoint import load_pruned

    run = ctx.work / "finetune_run"
    shutil.rmtree(run, ignore_errors=True)
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            "-m", "dimap_fast.cli", "finetune"]
    dev = ["--device", "cpu"] if ctx.dry else []
    first = base + ["--data", "digits", "--ratio", "0.5", "--epochs", "2", "--stop-after", "1", "--out", str(run),
                    "--no-progress", *dev]
    if ctx.dry:
        first += ["--max-train-samples", "64", "--max-val-samples", "32", "--batch-size", "16"]
    resume = base + ["--resume", "--out", str(run), "--no-progress", *dev]
    env = dict(os.environ, OMP_NUM_THREADS="1") if ctx.dry else dict(os.environ)
    for name, cmd, share in (("finetune.first_exit", first, 0.5), ("finetune.resume_exit", resume, 1.0)):
        with rows.row(name, "exit code") as c:
            timeout = max(10.0, (ctx.left() - 5) * share)
            rc, out = run_bounded(cmd, timeout, cwd=ROOT, env=env)
            print(f"$ {' '.join(cmd[1:])}\n" + "\n".join(out.splitlines()[-25:]), flush=True)
            if rc is None:
                raise RuntimeError(f"torchrun timed out after {timeout:.0f} s")
            c.value = rc
            where = re.search(r"(\d+ process\(es\) on \S+?);", out)
            epochs = re.findall(r"^epoch (\d+/\d+)", out, re.M)
            c.note = "; ".join(filter(None, [where and where.group(1), epochs and f"ran epoch {', '.join(epochs)}",
                                             rc and _tail(out)]))
    with rows.row("finetune.pruned_nonzero", "weights") as c:
        state, masks, meta = load_pruned(run / MODEL_FILE)
        if not masks:
            raise RuntimeError(f"{run / MODEL_FILE} holds no masks")
        c.value = sum(int(torch.count_nonzero(state[n][~m])) for n, m in masks.items())
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        c.note = f"{len(masks)} masked layers, {1 - kept / total:.1%} removed, val top-1 {meta.get('val_top1', '-')}"
    with rows.row("finetune.last_epoch", "epoch") as c:
        c.value = int(meta["epoch"])
        c.note = f"train state at epoch {load_train_state(run / STATE_FILE).epoch}"
