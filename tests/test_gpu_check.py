"""bench/gpu_check.py (its parts in bench/gpu/), the one command for a lent GPU: its dry run end to end (CPU, interpreter),
its refusal without CUDA, and the rule that a missing target row is never met."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_PATH = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "bench"), os.environ.get("PYTHONPATH")])))
ROW_KEYS = {"name", "value", "unit", "target", "met"}
REPORT_KEYS = {"card", "driver", "torch", "triton", "timm", "dry_run", "started", "seconds", "steps", "results"}


def gpu_check():
    import gpu.driver  # bench/ is on pytest's pythonpath

    return gpu.driver


def test_dry_run_reports_every_target(tmp_path):
    out = tmp_path / "report"
    # The dry run hides CUDA from its steps itself, so this also holds on a GPU machine.
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                          env=BENCH_PATH, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert len(done.stdout.splitlines()) <= 80  # progress plus a one-screen summary
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= report.keys() and report["dry_run"] is True
    gc = gpu_check()
    assert [s["name"] for s in report["steps"]] == list(gc.STEPS)
    assert all(s["status"] == "ok" and s["error"] is None for s in report["steps"]), report["steps"]
    rows = report["results"]
    assert all(ROW_KEYS <= r.keys() for r in rows)
    assert set(gc.expected_targets(dry_run=True)) <= {r["name"] for r in rows}
    missing = [r for r in rows if r.get("note") == "missing"]
    assert not [r["name"] for r in missing if r["target"] is not None]
    # an info job that found too little time left (a loaded host) says so, it is never dropped
    assert all(r["step"] == "speed" and r.get("error") for r in missing), missing
    assert all(r["met"] is None for r in rows if r["target"] is None)
    # correctness targets hold under the interpreter; timings are meaningless there
    assert all(r["met"] for r in rows if r["target"] is not None and r["met"] is not None and r["step"] != "speed"), \
        [r for r in rows if r["met"] is False and r["step"] != "speed"]
    # a real run's targets are shown, not judged: the tests step's (no skips, passed == collected) among them
    shown = {r["name"] for r in rows if r["target"] is not None and r["met"] is None}
    assert {"tests.failed", "tests.skipped", "tests.not_passed"} <= shown
    md = (out / "report.md").read_text()
    assert "dry run, CPU interpreter: timings meaningless" in md and "targets met" in md
    # the committed static report's estimates stand beside the rows it estimates
    assert report["estimates"] == "docs/bench/static.json", report["estimates"]
    estimated = {r["name"]: r["estimate"] for r in rows if "estimate" in r}
    assert {"speed.attn_train.swin_b384.s1.fp16.bias_sum_vs_flush",
            "speed.attn.swin_b384.s1.fp16.kv_prefetch_vs_off"} <= estimated.keys()
    assert {"speed.plan.swin_b", "speed.plan.swin_b.sort_ms"} <= estimated.keys()
    assert all(isinstance(v, float) for v in estimated.values())
    import tarfile

    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {f"logs/{s}.log" for s in gc.STEPS} <= set(tar.getnames())
    assert len(list(out.iterdir())) <= 8  # report.json, report.md, logs.tar.gz, the plots
    for s in report["steps"]:  # each step's cold-machine budget beside the compiles counted for it
        assert s["budget_s"] == gc.BUDGET_S[s["name"]] and s["compiles_planned"] > 0, s
    assert "compiles planned" in md
    # a planned row is never dropped: measured, or reported missing with its reason
    planned = {n for r in rows for n in r.get("planned", ())}
    assert planned and planned <= {r["name"] for r in rows}


def test_refuses_without_cuda_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    env = dict(BENCH_PATH, CUDA_VISIBLE_DEVICES="")  # no device, also on a GPU machine
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = (done.stdout + done.stderr).splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--dry-run" in lines[0], lines
    assert not out.exists()


def test_missing_target_row_is_never_met():
    gc = gpu_check()
    targets = {t.name: t for t in (gc.Target("plan.z", "<=", 3, "ms", "issue 4"),
                                   gc.Target("speed.x", ">=", 1.5, "x", "issue 14"),
                                   gc.Target("speed.y", "==", 0, "weights", "check"),
                                   gc.Target("speed.w", "<=", 1.0, "err", "check"))}
    measured = [{"name": "speed.info", "value": 3.0, "unit": "ms"},
                {"name": "speed.x", "value": 2.0, "unit": "x"},
                {"name": "plan.z", "value": math.nan, "unit": "ms"},
                {"name": "speed.w", "value": 0.5, "unit": "err", "error": "RuntimeError: boom"}]
    rows = gc.merge_rows(measured, targets, {"speed": "timed out after 180 s"}, steps=("plan", "speed"))
    assert [r["name"] for r in rows] == ["plan.z", "speed.x", "speed.y", "speed.w", "speed.info"]
    by = {r["name"]: r for r in rows}
    assert by["speed.x"]["met"] is True and by["speed.x"]["target"] == ">= 1.5x"
    missing = by["speed.y"]
    assert missing["value"] is None and missing["met"] is False and missing["note"] == "missing"
    assert missing["target"] == "== 0" and missing["error"] == "timed out after 180 s"
    assert by["plan.z"]["value"] is None and by["plan.z"]["met"] is False  # NaN never passes
    assert by["speed.w"]["met"] is False  # an error row is not met, whatever its value
    assert by["speed.info"]["target"] is None and by["speed.info"]["met"] is None
    assert all(ROW_KEYS <= r.keys() for r in rows)
    json.dumps(rows, allow_nan=False)


def test_target_table():
    gc = gpu_check()
    real, dry = gc.expected_targets(dry_run=False), gc.expected_targets(dry_run=True)
    assert {"tests.failed", "tests.skipped", "tests.not_passed"} <= real.keys() and "tests.collected" not in real
    assert "tests.collected" in dry and "tests.failed" not in dry
    assert all(t.name.split(".")[0] in gc.STEPS and t.source for t in gc.TARGETS)
    assert all("issue" in t.source for t in gc.TARGETS if t.name.startswith("speed."))
    assert len({t.name for t in gc.TARGETS}) == len(gc.TARGETS)
    # 8 minutes from process start with 30 s to spare; the budgets follow from the counted compiles
    assert gc.STARTUP_S + sum(gc.BUDGET_S.values()) <= 8 * 60 - 30
    from gpu.compiles import compile_seconds

    for step, budget in gc.BUDGET_S.items():
        assert budget >= compile_seconds(step, gc.PARALLEL[step]) + 20 or step == "speed", step
    assert gc.budgets(("speed",))["speed"] == gc.TOTAL_S - gc.STARTUP_S  # alone, speed gets the whole run
    # the cold-machine plan: every step in one of its runs, each run fitting with speed's compiles
    assert sorted(s for run in gc.COLD_RUNS for s in run) == sorted(gc.STEPS)
    assert all(gc.speed_fits(run) for run in gc.COLD_RUNS)
    assert list(gc.expected_targets(False, steps=("plan",))) == [f"plan.{m}.r{r}" for m in ("swin_t", "swin_b")
                                                                 for r in ("0.35", "0.55")]


def test_committed_compile_counts_are_current():
    """The budgets' compile counts equal a fresh count (launchers called, nothing run)."""
    import gpu.compiles as gcc

    env = dict(BENCH_PATH, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-m", "gpu.compiles"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert fresh == gcc.counts(), "kernels or shapes changed: cd bench && python -m gpu.compiles --write"


def test_a_step_past_its_timeout_is_killed_and_recorded(tmp_path):
    gc = gpu_check()
    env = gc.child_env(dry_run=True, wheel_dir=None)
    status, error = gc.run_step_process("tests", tmp_path / "rows.jsonl", tmp_path / "tests.log", env, 1.5, True, tmp_path)
    assert (status, error) == ("timeout", "timed out after 2 s")
    assert gc.read_rows(tmp_path / "rows.jsonl") == []  # killed before it measured anything
