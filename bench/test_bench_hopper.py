"""Every Triton kernel configuration fits a Hopper GPU (sm_90): the full table, both alignments.

Run with `make bench` (needs no GPU: the kernels are compiled for sm_90 on the CPU). The table also
shows each compile's registers and spills, the numbers to watch when a kernel or a tile changes.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_hopper_fit_table(bench_report):
    # conftest may have set TRITON_INTERPRET for this process; compiling for a GPU needs it gone
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "dimap_fast.hopper_fit"], env=env, text=True,
                          cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE)
    print("\n" + proc.stdout)
    assert proc.returncode == 0, proc.stdout.splitlines()[-1] if proc.stdout else "no table"
