"""One launch's estimated time on an H100, from its sm_90 code and its replayed programs.

Counts, per warp of one program:
- I, SASS instructions executed: each instruction once per execution; a loop body as often as its
  source loop ran in the replayed programs (line hits), over ptxas's unroll factor u (the loop's
  memory and matrix instructions over its PTX loop's, which ptxas never merges). The peeled and
  remainder copies ptxas emits around an unrolled loop are not counted: the n iterations are all
  charged at the main body's cost, n / u times (loop entry code between the copies, a few integer
  instructions per entry, is left out with them).
- load waits: the clusters of global loads a warp waits on in turn (a cluster is waited on where
  an instruction first reads what one of its loads wrote, or where a DEPBAR, maybe a later
  iteration's, waits for its async copies' group), each what is left of the DRAM latency after
  the instructions issued since it opened, times its executions;
- tensor FLOP: the HGMMA / HMMA shapes times their executions (an HGMMA is a warpgroup's).

Time, for P programs of w warps with R resident blocks per SM (hardware.py's constants):
- the grid over the SMs: the busiest SM runs p = ceil(P / SMs) programs, in ceil(p / R) waves;
- a wave of b blocks takes max(issue, chain, tensor) cycles: issue = ceil(b w / 4) I, the
  warp-instructions of its busiest scheduler at one a cycle; chain = one program's dependent
  path, I x ALU latency + its load waits + its tensor FLOP at the SM's full rate
  (nothing of a program overlaps itself but its loads' flight: the conservative side);
  tensor = b x its tensor FLOP at that rate;
- compute = the waves' cycles over the clock; memory = bytes over the copy rate, bytes counted
  per program as the 32-byte sectors it touches in each argument (re-reads by other programs
  count again), except arguments small enough to stay in L2, charged once.
The estimate is max(compute, memory): the two overlap fully, the optimistic side, so the report
also gives their sum. The floor (each input read once, each output written once) is the
workload's. All of it is an estimate.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from .hardware import H100, Gpu
from .sass import TENSOR_OPS, Sass, work_class

_MMA_SHAPE = re.compile(r"\.(\d+)x(\d+)x(\d+)")
_LOADS = ("LDG", "LDGSTS", "UTMALDG", "ATOMG")


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
    waves: int  # on the busiest SM
    issue_s: float  # its schedulers' issue time alone
    chain_s: float  # its programs' dependent paths alone, wave after wave
    tensor_s: float  # its tensor cores alone
    compute_s: float  # wave by wave, the largest of the three
    memory_s: float
    atomic_bytes: float = 0.0  # what its REDs / atomics add into L2, all lanes: shown, not priced

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def no_overlap_seconds(self) -> float:
        return self.compute_s + self.memory_s

    @property
    def bound(self) -> str:
        if self.memory_s >= self.compute_s:
            return "memory"
        parts = {"issue": self.issue_s, "latency": self.chain_s, "tensor": self.tensor_s}
        return max(parts, key=parts.get)


def resident_blocks(sass: Sass, gpu: Gpu = H100) -> int:
    warp_regs = math.ceil(max(sass.regs, 1) * 32 / 256) * 256  # handed out per warp, 256 at a time
    by_regs = gpu.regs_per_sm // (warp_regs * sass.num_warps)
    by_shared = gpu.shared_per_sm // sass.shared if sass.shared else gpu.max_blocks_per_sm
    by_threads = gpu.max_threads_per_sm // (32 * sass.num_warps)
    return max(0, min(by_regs, by_shared, by_threads, gpu.max_blocks_per_sm))


def _work(sass: Sass, lo: int, hi: int) -> Counter:
    return Counter(c for i in sass.insns[lo:hi + 1] if (c := work_class(i.op)))


def unroll(sass: Sass, lo: int, hi: int) -> int | None:
    """ptxas's unroll factor of the SASS loop lo..hi: u where its work is u times a PTX loop's."""
    work = _work(sass, lo, hi)
    if not work:
        return None
    for u in range(1, max(work.values()) + 1):
        if all(n % u == 0 for n in work.values()):
            per = {c: n // u for c, n in work.items()}
            if any(per == p for p in sass.ptx_loops):
                return u
    return None


def executions(sass: Sass, loops: list[tuple[int, int, int]], hits: dict, file: str) -> list[float]:
    """How often each instruction runs per program (per warp). ``loops``: the kernel file's source
    loops (first line, last line, line counted once an iteration); ``hits``: line hits per program."""
    def source_loop(lo: int, hi: int):
        branch = sass.insns[hi]
        inside = [l for l in loops if branch.file == file and l[0] <= branch.line <= l[1]]
        if not inside:
            lines = [i.line for i in sass.insns[lo:hi + 1] if i.file == file]
            votes = {l: sum(l[0] <= x <= l[1] for x in lines) for l in loops}
            inside = [l for l, v in votes.items() if lines and v * 2 >= len(lines)]
        return min(inside, key=lambda l: l[1] - l[0]) if inside else None

    def weight(ab) -> int:
        return sum(_work(sass, *ab).values()) or (ab[1] - ab[0] + 1)

    groups: dict = {}
    for lo, hi in sass.loops:
        groups.setdefault(source_loop(lo, hi), []).append((lo, hi))
    runs = {ab: 1.0 for ab in groups.pop(None, [])}  # a loop of no source loop: once (undercounts)
    dropped: set[int] = set()  # peeled and remainder copies: their iterations are charged to main
    for src, members in groups.items():
        main = max(members, key=weight)
        u = unroll(sass, *main) or max(1, round(weight(main) / min(weight(m) for m in members)))
        for m in members:
            runs[m] = hits.get((file, src[2]), 0.0) / u if m == main else 0.0
        dropped.update(_copies(sass, members, main, u))
    out = []
    for k in range(len(sass.insns)):
        loop = sass.loop_of(k)
        out.append(0.0 if k in dropped else runs[loop] if loop else 1.0)
    return out


def _copies(sass: Sass, members, main, u: int) -> list[int]:
    """The straight-line copies of a loop ptxas unrolled: the code from the zero-trip guard (a
    forward branch past the last copy) to the last copy, outside the copies that are loops, when
    its work is a whole number of iterations (else it is left counted once: the safe side)."""
    first, last = min(m[0] for m in members), max(m[1] for m in members)
    guards = [k for k in range(first) if sass.insns[k].target > last]
    if not guards:
        return []
    lo = guards[-1] + 1
    if any(a >= lo and b <= last and (a, b) not in members for a, b in sass.loops):
        return []  # another loop inside: not a plain run of copies
    inside = [k for k in range(lo, last + 1) if not any(a <= k <= b for a, b in members)]
    per = {c: n / u for c, n in _work(sass, *main).items()}
    work = Counter(c for k in inside if (c := work_class(sass.insns[k].op)))
    ratios = {work.get(c, 0) / n for c, n in per.items() if n}
    if set(work) - set(per) or len(ratios) != 1 or not float(ratios.pop()).is_integer():
        return []
    return inside


_ASYNC = ("LDGSTS", "UTMALDG")


def load_wait_cycles(sass: Sass, execs: list[float], gpu: Gpu = H100) -> float:
    """Per warp, the cycles its dependent path waits on global loads. A cluster of loads opens at
    a load and is waited on once: where an instruction first reads a register one of them wrote
    (a scoreboard wait); for async copies, at the DEPBAR that waits for their commit group (one
    allowing fewer groups in flight than were committed after it) or an mbarrier's PHASECHK;
    otherwise where its innermost loop (or the code between loops) ends, or, for copies still in
    flight there, at the DEPBAR of the later iteration that waits for them. Loads issued before
    that wait on it too. The wait is what is left of the DRAM latency after the instructions issued since
    the cluster's first load, at the path's ALU latency each."""
    cycles, region, issued = 0.0, None, 0
    pending: set | None = None  # the open cluster's registers; None: no cluster open
    opened = runs = 0.0  # the cluster's first load: instructions issued before it, its executions
    last_copy, commits = -1, 0  # its last async copy (-1: none), groups committed since

    def wait(later: int = 0) -> float:
        return max(0.0, gpu.dram_latency_cycles
                   - gpu.alu_latency_cycles * (issued - opened + later)) * runs

    for k, insn in enumerate(sass.insns):
        here = sass.loop_of(k)
        op = insn.op.split(".")[0]
        if pending is not None:
            waited = (pending.intersection(insn.reads) or insn.op.startswith("SYNCS.PHASECHK")
                      or (op == "DEPBAR" and last_copy >= 0 and commits - 1 >= max(insn.depth, 0)))
            if waited or here != region:
                later = 0 if waited or region is None or last_copy < 0 else \
                    _in_flight(sass, execs, region, last_copy)
                cycles, pending = cycles + wait(later), None
        region = here
        if not execs[k]:
            continue  # code that never runs (ptxas's peeled copies, charged to their loop)
        if op in _LOADS and pending is None:
            pending, opened, runs, last_copy = set(), issued, execs[k], -1
        if op in _LOADS:
            pending.update(insn.writes)
            if op in _ASYNC:
                last_copy, commits = k, 0
        elif op == "LDGDEPBAR":
            commits += 1
        issued += 1
    return cycles + (wait() if pending is not None else 0.0)


def _in_flight(sass: Sass, execs: list[float], loop: tuple[int, int], last_copy: int) -> int:
    """Instructions, past its loop body's end, until the DEPBAR of a later iteration that waits for
    the group committed after ``last_copy`` (0 where no DEPBAR of the loop does: waited at the end)."""
    lo, hi = loop
    body = [k for k in range(lo, hi + 1) if execs[k]]
    commits = [k for k in body if sass.insns[k].op.startswith("LDGDEPBAR")]
    waits = [k for k in body if sass.insns[k].op.startswith("DEPBAR")]
    mine = next((k for k in commits if k > last_copy), None)
    if mine is None or not waits:
        return 0
    newer = sum(k > mine for k in commits)  # groups committed after it in its own iteration
    for later in range(1, 1 + max(max(sass.insns[d].depth, 0) for d in waits) // len(commits) + 1):
        for d in waits:
            if newer + len(commits) * (later - 1) + sum(k < d for k in commits) >= max(sass.insns[d].depth, 0):
                return (later - 1) * len(body) + sum(k < d for k in body)
    return 0


def _tensor_flops(sass: Sass, execs: list[float]) -> tuple[float, str]:
    """Per program: FLOP of its matrix instructions, and the operand type they run at."""
    flops, kind = 0.0, "fp16"
    for insn, n in zip(sass.insns, execs):
        op = insn.op.split(".")[0]
        if op in TENSOR_OPS and (m := _MMA_SHAPE.search(insn.op) or re.search(r"\.(\d)(\d)(\d\d)", insn.op)):
            mm, nn, kk = (int(x) for x in m.groups())
            # HGMMA: a warpgroup of 4 warps issues one m64nNkK between them; HMMA: each warp its own
            share = sass.num_warps / 4 if op in ("HGMMA", "QGMMA") else sass.num_warps
            flops += 2 * mm * nn * kk * n * share
            if "TF32" in insn.op:
                kind = "tf32"
            elif "BF16" in insn.op:
                kind = "bf16"
    return flops, kind


@dataclass(frozen=True)
class ProgramCost:
    """One program's work, per warp: instructions, its dependent path and its tensor cycles."""

    per_warp: float
    chain_cycles: float
    mma_cycles: float
    atomic_bytes: float = 0.0  # per warp


_ATOMICS = ("RED", "REDG", "ATOMG", "ATOM")
_LANE_BYTES = {"64": 8, "F64": 8, "U64": 8, "S64": 8, "F16x2": 4, "BF16x2": 4}


def atomic_bytes(sass: Sass, execs: list[float]) -> float:
    """Bytes a warp's atomics add into L2: each executed instruction, 32 lanes of its width (4 bytes
    unless it names a 64-bit type). Contention on the same addresses is what costs, and nothing
    here knows its price: the report shows the bytes so a GPU run can calibrate them."""
    total = 0.0
    for insn, n in zip(sass.insns, execs):
        parts = insn.op.split(".")
        if parts[0] in _ATOMICS and n:
            total += n * 32 * next((_LANE_BYTES[p] for p in parts[1:] if p in _LANE_BYTES), 4)
    return total


def program_cost(sass: Sass, hits: dict, file: str, loops, gpu: Gpu = H100) -> ProgramCost:
    execs = executions(sass, loops, hits, file)
    per_warp = sum(execs)
    flops, kind = _tensor_flops(sass, execs)
    mma = flops / gpu.flops_per_clock(kind)  # at the SM's whole rate
    chain = per_warp * gpu.alu_latency_cycles + load_wait_cycles(sass, execs, gpu) + mma
    return ProgramCost(per_warp, chain, mma, atomic_bytes(sass, execs))


def compute_cycles(cost: ProgramCost, programs: int, resident: int, num_warps: int,
                   gpu: Gpu = H100) -> tuple[int, float, float, float, float]:
    """The busiest SM's waves: (waves, issue, chain, tensor, total) cycles."""
    per_sm = math.ceil(programs / gpu.sms)
    resident = max(1, resident)
    waves = math.ceil(per_sm / resident)
    issue = tensor = cycles = 0.0
    for wave in range(waves):
        blocks = min(resident, per_sm - wave * resident)
        i = math.ceil(blocks * num_warps / gpu.schedulers_per_sm) * cost.per_warp
        issue, tensor = issue + i, tensor + blocks * cost.mma_cycles
        cycles += max(i, cost.chain_cycles, blocks * cost.mma_cycles)
    return waves, issue, waves * cost.chain_cycles, tensor, cycles


def estimate(name: str, sass: Sass, replay, file: str, loops, programs: int,
             gpu: Gpu = H100) -> KernelEstimate:
    cost = program_cost(sass, replay.line_hits, file, loops, gpu)
    waves, issue, chain, tensor, cycles = compute_cycles(cost, programs, resident_blocks(sass, gpu),
                                                         sass.num_warps, gpu)
    nbytes = sum(min(replay.footprint[n], b * programs) if replay.footprint[n] <= gpu.l2_bytes // 2
                 else b * programs for n, b in replay.unique_bytes.items())
    hz = gpu.clock_hz
    return KernelEstimate(name, programs, sass.num_warps, sass.regs, sass.shared, sass.spill,
                          resident_blocks(sass, gpu), cost.per_warp, sass.count(*TENSOR_OPS),
                          sass.fenced_atomics_in_loops(), nbytes, waves, issue / hz, chain / hz,
                          tensor / hz, cycles / hz, gpu.memory_seconds(nbytes),
                          cost.atomic_bytes * sass.num_warps * programs)
