"""The H100 the static cost model charges against: every constant it uses lives here, with its source.

Nothing here is measured on this project's machines (no GPU has been lent): the copy rate is the
one a large device-to-device copy reaches on an H100 SXM (about 90% of the 3.35 TB/s datasheet
peak); SM counts, register file, shared memory and tensor-core rates per clock are NVIDIA's
published figures for the H100 SXM5 (its 989 TFLOP/s fp16 are 4096 FLOP per clock per SM at
1.83 GHz); the clock is the one it sustains under load, so the peaks derived here are lower than
the datasheet's. The latencies are round figures from published microbenchmarks, chosen at the
slow end. Every number the model derives from them is an estimate.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str = "H100 SXM (static model)"
    sms: int = 132
    clock_hz: float = 1.755e9  # sustained under load (1.98 GHz peak boost, 1.83 GHz datasheet)
    schedulers_per_sm: int = 4  # each issues at most one warp-instruction per cycle
    copy_bytes_per_s: float = 3.0e12  # a large DRAM copy, bytes read + bytes written
    l2_bytes: int = 50 * 2**20
    # Dense tensor-core FLOP per clock per SM by operand type (fp32 operands run as tf32; "ieee"
    # fp32 dots run on the FMA units: 128 lanes x 2).
    flops_per_clock_sm: tuple = (("fp16", 4096), ("bf16", 4096), ("tf32", 2048), ("fp32", 256))
    regs_per_sm: int = 65536
    shared_per_sm: int = 233472  # 228 KiB
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    # Cycles one warp waits before its next dependent instruction: the average over ALU, MUFU and
    # shuffle results (4 to ~25 cycles; no instruction-level parallelism assumed), and a global
    # load that misses L2 (~500-700 cycles; the slow end).
    alu_latency_cycles: float = 5.0
    dram_latency_cycles: float = 700.0
    # Host-side costs a sequence of launches pays on top of the kernels' own time.
    launch_s: float = 5e-6  # one kernel launch from Python, back to back (torch op or Triton)
    sync_s: float = 15e-6  # one device-to-host read: the queue drains, then the round trip
    cublas_fraction: float = 0.7  # share of the tensor peak a cuBLAS GEMM of Swin's shapes reaches

    def flops_per_clock(self, kind: str) -> float:
        return dict(self.flops_per_clock_sm)[kind]

    def tensor_peak(self, kind: str) -> float:
        """FLOP/s of the whole GPU at the sustained clock."""
        return self.flops_per_clock(kind) * self.sms * self.clock_hz

    def memory_seconds(self, nbytes: float) -> float:
        return nbytes / self.copy_bytes_per_s


H100 = Gpu()
