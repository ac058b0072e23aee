"""Peak memory of batch pruning, each case in a fresh process (random-init timm models, no downloads).

Run with `make bench`; the last test checks the targets of issue 22 from this run's numbers:
- a sweep over Swin-T/S/B at 3 ratios peaks at <= 3x Swin-B's weights above the runtime (the
  peak of a process that imported torch, timm and dimap_fast and built nothing);
- `dimap-fast prune` of Swin-L peaks at <= 2x its weights above a process that built the model.
Peaks are the processes' own ru_maxrss (resident set), so the glibc heap's kept pages count.
"""

import json
import subprocess
import sys
import textwrap

import pytest
from results import RESULTS

MODELS = ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224"]
LARGE = "swin_large_patch4_window7_224"
RATIOS = [0.15, 0.35, 0.55]
MB = 2**20

_PRELUDE = """
import json, resource, sys
import timm, torch
import dimap_fast, dimap_fast.cli.sweep_body
from dimap_fast.cli import main as cli_main
def weights(name):
    with torch.device("meta"):
        return sum(p.numel() * 4 for p in timm.create_model(name).parameters())
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""


def _run(body: str, *args) -> dict:
    code = _PRELUDE + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_runtime_peak():
    RESULTS["mem/runtime"] = _run("print(json.dumps({'peak': peak()}))")["peak"]


def test_sweep_peak(tmp_path):
    got = _run("""
        from pathlib import Path
        dimap_fast.cli.sweep_body.sweep(sys.argv[1].split(","), [float(r) for r in sys.argv[2].split(",")], ["dimap"],
                               Path(sys.argv[3]), progress=False)
        print(json.dumps({"peak": peak(), "base": weights(sys.argv[1].split(",")[-1])}))
    """, ",".join(MODELS), ",".join(map(str, RATIOS)), tmp_path / "sweep")
    RESULTS["mem/sweep"], RESULTS["mem/base_weights"] = got["peak"], got["base"]


def test_large_prune_extra_peak(tmp_path):
    model = _run("""
        torch.manual_seed(0)
        model = timm.create_model(sys.argv[1])
        print(json.dumps({"peak": peak(), "weights": weights(sys.argv[1])}))
    """, LARGE)
    pruned = _run("""
        code = cli_main(["prune", sys.argv[1], "--ratio", "0.5", "--out", sys.argv[2]])
        assert code in (0, None), code
        print(json.dumps({"peak": peak()}))
    """, LARGE, tmp_path / "large.safetensors")
    RESULTS["mem/large_extra"] = pruned["peak"] - model["peak"]
    RESULTS["mem/large_weights"] = model["weights"]


def test_memory_targets_measured_in_this_run(bench_report):
    runtime = RESULTS.get("mem/runtime")
    base, large = RESULTS.get("mem/base_weights"), RESULTS.get("mem/large_weights")
    sweep = extra = None
    if runtime is not None:
        print(f"\nruntime (imports only) {runtime / MB:.0f} MiB")
    if None not in (runtime, base) and "mem/sweep" in RESULTS:
        sweep = (RESULTS["mem/sweep"] - runtime) / base
        print(f"sweep T/S/B x {len(RATIOS)} ratios: peak {RESULTS['mem/sweep'] / MB:.0f} MiB = runtime + "
              f"{sweep:.2f}x Swin-B's weights ({base / MB:.0f} MiB)")
    if large is not None and "mem/large_extra" in RESULTS:
        extra = RESULTS["mem/large_extra"] / large
        print(f"prune Swin-L: extra peak {RESULTS['mem/large_extra'] / MB:.0f} MiB = {extra:.2f}x its weights "
              f"({large / MB:.0f} MiB)")
    assert sweep is not None and extra is not None, "run the whole file: a row is missing"
    assert sweep <= 3.0, f"the sweep peaks at runtime + {sweep:.2f}x Swin-B's weights"
    assert extra <= 2.0, f"pruning Swin-L peaks at {extra:.2f}x its weights above the model"
