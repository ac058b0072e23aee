"""One launch's estimated time on an H100, from its sm_90 code and its replayed programs.

- SASS instructions per program: each instruction counted once per execution, an instruction in a
  loop body as many times as the source loop it came from ran (line hits of the replayed
  programs); where ptxas unrolled a loop into a main body and remainder copies, the main body runs
  iterations / unroll and the copies are left out (at most unroll - 1 iterations, uncounted).
- issue time: warp-instructions of all programs over the GPU's issue slots (132 SMs x 4 per cycle);
  latency time: resident blocks run in waves, each warp waiting on its dependent instructions when
  few warps share a scheduler (hardware.py's latencies);
- tensor time: the HGMMA / HMMA shapes times their executions over the tensor-core peak;
- memory time: per program, the 32-byte sectors it touches in each argument (so re-reads by
  other programs count again), except arguments small enough to stay in L2, charged once.
The estimate is the largest of the four; the floor (each input read once, each output written
once) is the workload's. All of it is an estimate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .hardware import H100, Gpu
from .sass import GLOBAL_OPS, TENSOR_OPS, Sass

_MMA_SHAPE = re.compile(r"\.(\d+)x(\d+)x(\d+)")


@dataclass(frozen=True)
class KernelEstimate:
    name: str
    programs: int
    num_warps: int
    regs: int
    shared: int
    spill: int
    resident: int  # blocks per SM
    sass_per_program: float  # per warp
    tensor_insns: int  # in the code, not executed
    fenced_atomics_in_loops: int
    bytes: float
    issue_s: float
    latency_s: float
    tensor_s: float
    memory_s: float

    @property
    def seconds(self) -> float:
        return max(self.issue_s, self.latency_s, self.tensor_s, self.memory_s)

    @property
    def bound(self) -> str:
        parts = {"issue": self.issue_s, "latency": self.latency_s, "tensor": self.tensor_s,
                 "memory": self.memory_s}
        return max(parts, key=parts.get)


def resident_blocks(sass: Sass, gpu: Gpu = H100) -> int:
    warp_regs = math.ceil(max(sass.regs, 1) * 32 / 256) * 256  # handed out per warp, 256 at a time
    by_regs = gpu.regs_per_sm // (warp_regs * sass.num_warps)
    by_shared = gpu.shared_per_sm // sass.shared if sass.shared else gpu.max_blocks_per_sm
    by_threads = gpu.max_threads_per_sm // (32 * sass.num_warps)
    return max(0, min(by_regs, by_shared, by_threads, gpu.max_blocks_per_sm))


def executions(sass: Sass, loops: list[tuple[int, int, int]], hits: dict, file: str) -> list[float]:
    """How often each instruction runs per program (per warp)."""
    def source_loop(lo: int, hi: int):
        branch = sass.insns[hi]
        inside = [l for l in loops if branch.file == file and l[0] <= branch.line <= l[1]]
        if not inside:
            lines = [i.line for i in sass.insns[lo:hi + 1] if i.file == file]
            votes = {l: sum(l[0] <= x <= l[1] for x in lines) for l in loops}
            inside = [l for l, v in votes.items() if lines and v * 2 >= len(lines)]
        return min(inside, key=lambda l: l[1] - l[0]) if inside else None

    def weight(lo: int, hi: int) -> int:  # memory and matrix work, the part unrolling repeats
        n = sum(i.op.split(".")[0] in GLOBAL_OPS + TENSOR_OPS + ("LDS", "STS", "LDSM")
                for i in sass.insns[lo:hi + 1])
        return n or (hi - lo + 1)

    mapped = [(lo, hi, source_loop(lo, hi)) for lo, hi in sass.loops]
    runs = {}
    for lo, hi, src in mapped:
        if src is None:
            runs[(lo, hi)] = 1.0
            continue
        group = [(a, b) for a, b, s in mapped if s == src]
        base = min(weight(a, b) for a, b in group)
        main = max(group, key=lambda ab: weight(*ab))
        unroll = max(1, round(weight(*main) / base))
        iters = hits.get((file, src[2]), 0.0)
        runs[(lo, hi)] = iters / unroll if (lo, hi) == main else 0.0
    out = []
    for k in range(len(sass.insns)):
        enclosing = [(lo, hi) for lo, hi in sass.loops if lo <= k <= hi]
        out.append(runs[min(enclosing, key=lambda ab: ab[1] - ab[0])] if enclosing else 1.0)
    return out


def _tensor_flops(sass: Sass, execs: list[float]) -> tuple[float, str]:
    flops, kind = 0.0, "fp16"
    for insn, n in zip(sass.insns, execs):
        op = insn.op.split(".")[0]
        if op in TENSOR_OPS and (m := _MMA_SHAPE.search(insn.op) or re.search(r"\.(\d)(\d)(\d\d)", insn.op)):
            mm, nn, kk = (int(x) for x in m.groups())
            # HGMMA: a warpgroup of 4 warps issues one m64nNkK between them; HMMA: each warp its own
            share = sass.num_warps / 4 if op in ("HGMMA", "QGMMA") else sass.num_warps
            flops += 2 * mm * nn * kk * n * share
            if ".TF32" in insn.op or "F32.TF32" in insn.op:
                kind = "tf32"
            elif ".BF16" in insn.op:
                kind = "bf16"
    return flops, kind


def estimate(name: str, sass: Sass, replay, file: str, loops, programs: int,
             gpu: Gpu = H100) -> KernelEstimate:
    execs = executions(sass, loops, replay.line_hits, file)
    per_warp = sum(execs)
    loads = sum(n for i, n in zip(sass.insns, execs) if i.op.split(".")[0] in ("LDG", "LDGSTS"))
    resident = max(1, resident_blocks(sass, gpu))
    warp_insns = per_warp * sass.num_warps * programs
    issue = warp_insns / (gpu.sms * gpu.schedulers_per_sm * gpu.clock_hz)
    per_scheduler = max(1.0, resident * sass.num_warps / gpu.schedulers_per_sm)
    cycles = (per_warp * max(1.0, gpu.alu_latency_cycles / per_scheduler)
              + loads * gpu.load_latency_cycles / per_scheduler)
    waves = math.ceil(programs / (gpu.sms * resident))
    latency = waves * cycles / gpu.clock_hz
    flops, kind = _tensor_flops(sass, execs)
    tensor = flops * programs / gpu.tensor_peak(kind)
    nbytes = sum(min(replay.footprint[n], b * programs) if replay.footprint[n] <= gpu.l2_bytes // 2
                 else b * programs for n, b in replay.unique_bytes.items())
    return KernelEstimate(name, programs, sass.num_warps, sass.regs, sass.shared, sass.spill,
                          resident_blocks(sass, gpu), per_warp, sass.count(*TENSOR_OPS),
                          sass.fenced_atomics_in_loops(), nbytes, issue, latency, tensor,
                          gpu.memory_seconds(nbytes))
