"""The H100 the static cost model charges against: every constant it uses lives here, with its source.

Nothing here is measured on this project's machines (no GPU has been lent): the copy rate is the
one a large device-to-device copy reaches on an H100 SXM (about 90% of the 3.35 TB/s datasheet
peak), the rest are NVIDIA's published figures for the H100 SXM5. Every number the model derives
from them is an estimate.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str = "H100 SXM (static model)"
    sms: int = 132
    clock_hz: float = 1.755e9  # sustained boost under load (1.98 GHz peak)
    schedulers_per_sm: int = 4  # each issues one warp-instruction per cycle at best
    copy_bytes_per_s: float = 3.0e12  # a large DRAM copy, bytes read + bytes written
    l2_bytes: int = 50 * 2**20
    # Dense tensor-core peak, FLOP/s, by operand type (fp32 operands run as tf32; "ieee" fp32 dots
    # run on the FMA units).
    tensor_flops: tuple = (("fp16", 989e12), ("bf16", 989e12), ("tf32", 495e12), ("fp32", 67e12))
    regs_per_sm: int = 65536
    shared_per_sm: int = 233472  # 228 KiB
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    # Cycles a warp waits before its next dependent instruction, when too few warps share a
    # scheduler to hide it: ALU results (~4-6 cycles) and global loads served by L2 (~260).
    alu_latency_cycles: float = 5.0
    load_latency_cycles: float = 260.0
    # Host-side costs a sequence of launches pays on top of the kernels' own time.
    launch_s: float = 4e-6  # one kernel launch from Python, back to back
    sync_s: float = 10e-6  # one device-to-host read: the queue drains, then a round trip
    cublas_fraction: float = 0.7  # share of tensor_flops a cuBLAS GEMM of Swin's shapes reaches

    def tensor_peak(self, kind: str) -> float:
        return dict(self.tensor_flops)[kind]

    def memory_seconds(self, nbytes: float) -> float:
        return nbytes / self.copy_bytes_per_s


H100 = Gpu()
