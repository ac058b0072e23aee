"""Does every Triton kernel configuration the engine can launch fit an NVIDIA Hopper GPU (sm_90)?

Each ``dimap_fast.kernels.launch_configs()`` entry is compiled for sm_90 on the CPU (compiling needs
no GPU) and the cubin's resources are read with cuobjdump. A config fits when one block of it can
launch: shared memory within the per-block limit, registers within the per-thread and per-SM
limits. Spills are shown, not judged: they cost speed, not correctness.

Every config is compiled twice, because triton specializes a launch on which arguments are
multiples of 16 and the two compiles differ widely (block-sparse linear, fp16, B=32, BM=128: 217
registers and 10 KiB shared with no hint, 62 registers and 20 KiB with all): once with no argument
known to be a multiple of 16, once with every pointer and integer argument one. Real launches lie
between (torch's tensors are aligned; sizes vary). Neither bounds the other: the aligned one
usually pipelines through more shared memory, yet some window-attention configs need more without.

Run ``python -m dimap_fast.hopper_fit`` with TRITON_INTERPRET unset: it prints one row per compile
and exits 1 if any does not fit, 2 if it cannot run.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

from .errors import DimapError

TARGET = ("cuda", 90, 32)  # backend, compute capability (H100/H200), warp size
SHARED_PER_BLOCK = 232448  # 227 KiB: the opt-in maximum for one block, dynamic + static
REGS_PER_THREAD = 255
REGS_PER_SM = 65536


@dataclass(frozen=True)
class Fit:
    """What one compile needs from the GPU; ``error`` is its first line when it did not compile."""

    name: str
    aligned: bool  # every pointer and integer argument assumed a multiple of 16
    num_warps: int
    num_stages: int
    shared: int = 0  # bytes per block: triton's dynamic + the cubin's static
    regs: int = 0  # per thread
    spill: int = 0  # bytes per thread: stack frame + local memory
    seconds: float = 0.0  # compile time, a cold triton cache's cost of this row
    error: str = ""

    @property
    def fits(self) -> bool:
        # Registers are handed out per warp in steps of 256; for power-of-two warp counts that
        # rounding never changes this product test.
        return (not self.error and self.shared <= SHARED_PER_BLOCK and self.regs <= REGS_PER_THREAD
                and self.regs * TARGET[2] * self.num_warps <= REGS_PER_SM)


def _cubin_resources(cubin: bytes, cuobjdump: str) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True,
                              check=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {k: int(v) for k, v in re.findall(r"([A-Z]+):(\d+)", line)}


def _compile(task: tuple) -> Fit:
    """Compile one config in a worker process; the kernel travels as (module, name)."""
    module, kernel_name, name, signature, constexprs, num_warps, num_stages, aligned, cuobjdump = task
    row = Fit(name, aligned, num_warps, num_stages)
    start = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        kernel = getattr(importlib.import_module(module), kernel_name)
        attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values())
                 if aligned and (t.startswith("*") or t in ("i32", "i64"))}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=GPUTarget(*TARGET),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
        res = _cubin_resources(compiled.asm["cubin"], cuobjdump)
    except Exception as e:  # noqa: BLE001 - a config that does not compile is a row, not a crash
        first = (str(e).strip().splitlines() or [""])[0]
        return replace(row, seconds=time.perf_counter() - start, error=f"{type(e).__name__}: {first}")
    return Fit(name, aligned, num_warps, num_stages, shared=compiled.metadata.shared + res["SHARED"],
               regs=res["REG"], spill=res["STACK"] + res["LOCAL"],
               seconds=time.perf_counter() - start)


def _tools(configs) -> tuple[str, int]:
    """(cuobjdump's path, triton's default stages), or a DimapError saying why this cannot run."""
    try:
        import triton
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError as e:
        raise DimapError(f"triton with its NVIDIA backend is needed ({e}): pip install triton") from None
    from .kernels._common import interpreting

    if any(interpreting(c.kernel) for c in configs):
        raise DimapError("TRITON_INTERPRET is set: the interpreter cannot compile for a GPU; "
                         "unset it and run again")
    try:
        cuobjdump = triton.knobs.nvidia.cuobjdump.path
    except RuntimeError as e:
        raise DimapError(f"{e}: set TRITON_CUOBJDUMP_PATH to a CUDA cuobjdump") from None
    return cuobjdump, CUDAOptions.num_stages


def measure(configs=None, *, workers: int | None = None, progress: bool = True) -> list[Fit]:
    """Compile every config (all of launch_configs() by default) both ways; one Fit per compile."""
    from tqdm import tqdm

    from .kernels import launch_configs

    configs = launch_configs() if configs is None else configs
    cuobjdump, default_stages = _tools(configs)
    tasks = [(c.kernel.__module__, c.kernel.__name__, c.name, c.signature, c.constexprs,
              c.num_warps, c.num_stages or default_stages, aligned, cuobjdump)
             for c in configs for aligned in (False, True)]
    workers = workers or len(os.sched_getaffinity(0))
    # spawn: a forked child would inherit the parent's CUDA and triton state
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool, \
            tqdm(total=len(tasks), desc="sm_90 compiles", unit="cfg", disable=not progress) as bar:
        futures = [pool.submit(_compile, t) for t in tasks]
        for _ in cf.as_completed(futures):
            bar.update()
    return [f.result() for f in futures]


def format_table(rows: list[Fit]) -> str:
    """One aligned line per compile, then a one-line verdict."""
    head = ("config", "aligned", "warps", "stages", "shared KiB", "regs", "spill B", "compile s",
            "fits")
    body = [(r.name, "yes" if r.aligned else "no", str(r.num_warps), str(r.num_stages),
             f"{r.shared / 1024:.1f}", str(r.regs), str(r.spill), f"{r.seconds:.1f}",
             "yes" if r.fits else "NO" + (f"  {r.error}" if r.error else ""))
            for r in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head) - 1)]

    def line(cells):
        first = cells[0].ljust(widths[0])
        rest = "  ".join(c.rjust(w) for c, w in zip(cells[1:-1], widths[1:]))
        return f"{first}  {rest}  {cells[-1]}"

    bad = sum(not r.fits for r in rows)
    verdict = (f"all {len(rows)} compiles fit sm_90" if not bad
               else f"{bad} of {len(rows)} compiles do NOT fit sm_90")
    return "\n".join([line(head), *map(line, body), verdict])


def main() -> int:
    try:
        rows = measure()
    except DimapError as e:
        print(f"hopper_fit: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0 if all(r.fits for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
