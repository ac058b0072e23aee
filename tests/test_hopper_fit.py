"""Every Triton kernel configuration the engine can launch fits a Hopper GPU (sm_90), checked on
this CPU by compiling for sm_90 (dimap_fast.hopper_fit); and launch_configs() misses no kernel.
"""

import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import dimap_fast.kernels as kernels  # noqa: E402
from dimap_fast.hopper_fit import SHARED_PER_BLOCK, Fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _run_hopper_fit(**env_changes):
    # conftest sets TRITON_INTERPRET for this process; compiling for a GPU needs it gone
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-m", "dimap_fast.hopper_fit"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=2400)


def _kernel_modules():
    return {m.name: importlib.import_module(f"{kernels.__name__}.{m.name}")
            for m in pkgutil.iter_modules(kernels.__path__) if not m.name.startswith("_")}


def _launched_kernels(module) -> set[str]:
    """Names of the module's own @triton.jit kernels, less helpers that other kernels call."""
    jit = {name: obj for name, obj in vars(module).items()
           if type(obj).__name__ in ("JITFunction", "InterpretedFunction")
           and obj.fn.__module__ == module.__name__}
    called = {n for obj in jit.values() for n in obj.fn.__code__.co_names}
    return {name for name in jit if name not in called}


@pytest.fixture(scope="module")
def table():
    proc = _run_hopper_fit()
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    return proc


def _rows(table) -> list[str]:
    return table.stdout.splitlines()[1:-1]  # less the header and the verdict


def test_every_launch_config_fits_hopper(table):
    rows = _rows(table)
    misfits = [row for row in rows if not row.endswith("yes")]
    assert rows, "an empty configuration table checks nothing"
    assert table.returncode == 0 and not misfits, "\n".join(misfits)


def test_table_has_a_row_per_config_and_alignment(table):
    assert len(_rows(table)) == 2 * len(kernels.launch_configs())


def test_enumeration_covers_every_kernel():
    modules = _kernel_modules()
    launched = {(module.__name__, kernel) for module in modules.values() for kernel in _launched_kernels(module)}
    configs = kernels.launch_configs()
    covered = {(c.kernel.fn.__module__, c.kernel.fn.__name__) for c in configs}
    assert launched and not launched - covered, f"never enumerated: {sorted(launched - covered)}"
    for c in configs:
        assert list(c.signature) == list(c.kernel.arg_names), c.name


def test_table_has_a_row_per_launched_kernel(table):
    """Every kernel a launcher starts has compiled rows in the table, both ways (no empty module)."""
    rows = _rows(table)
    names = {c.name: (c.kernel.fn.__module__, c.kernel.fn.__name__) for c in kernels.launch_configs()}
    per_kernel = {}
    for row in rows:
        name = next((n for n in sorted(names, key=len, reverse=True) if row.startswith(n + " ")), None)
        assert name is not None, f"a table row of no launch config: {row}"
        per_kernel.setdefault(names[name], []).append(row)
    launched = {(m.__name__, k) for m in _kernel_modules().values() for k in _launched_kernels(m)}
    few = sorted(f"{mod}.{fn}" for mod, fn in launched if len(per_kernel.get((mod, fn), ())) < 2)
    assert not few, f"kernels with no row per alignment in the table: {few}"


def test_fit_rule_rejects_what_cannot_launch():
    ok = Fit("fake", False, num_warps=4, num_stages=3, shared=100 * 1024, regs=128)
    assert ok.fits
    assert not Fit("fake", False, 4, 3, shared=300 * 1024, regs=64).fits
    assert Fit("fake", False, 4, 3, shared=SHARED_PER_BLOCK, regs=64).fits
    assert not Fit("fake", False, 4, 3, shared=SHARED_PER_BLOCK + 1, regs=64).fits
    assert not Fit("fake", False, 4, 3, regs=256).fits  # over the per-thread limit
    assert not Fit("fake", False, 16, 3, regs=255).fits  # 255 x 32 x 16 > 65536 per SM
    assert Fit("fake", False, 8, 3, regs=255).fits
    assert not Fit("fake", False, 4, 3, error="CompilationError: boom").fits


def test_refuses_to_run_under_the_interpreter():
    proc = _run_hopper_fit(TRITON_INTERPRET="1")
    assert proc.returncode == 2
    assert "TRITON_INTERPRET" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
