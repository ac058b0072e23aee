"""A static cost model of the project's Triton kernels on an H100, read from their sm_90 code.
Every figure it gives is an estimate; nothing here runs on a GPU.

How a row is made: each kernel's own launcher is called on CPU tensors as if on a GPU (capture:
the launch is recorded, not run), compiled for sm_90 with that launch's specialization (sass:
cached in the cache folder of dimap_fast.host, sass/), and a few of its programs are replayed in the interpreter
for loop trip counts and the 32-byte sectors they touch. Per launch (kernel_cost):

    I      = SASS instructions a warp executes per program (loop bodies x trips / ptxas's unroll)
    chain  = I x 5 cycles + load waits x 700 cycles + the program's HGMMA FLOP / (4096 FLOP/clk)
    wave   = max(ceil(blocks x warps / 4) x I, chain, blocks x HGMMA cycles)   [R blocks/SM]
    compute = sum over the busiest SM's ceil(ceil(P / 132) / R) waves, at 1.755 GHz
    memory  = sectors touched x programs (L2-resident arguments once) / 3.0 TB/s
    time   = max(compute, memory)         (the report also gives compute + memory)

Baselines (baselines): timm's eager and SDPA attention as the bytes each aten op moves (a
dispatch mode over meta tensors), each op at the copy rate or its FLOPs at the tensor peak,
launches free, so they are lower bounds; cuBLAS at 70% of the tensor peak. masks() (masks_cost):
its real launch sequence recorded on two tiny stand-ins and carried to the real model's size;
each launch costs 5 us to issue and each host read 15 us. Constants: hardware.py.
``dimap-fast bench --static [--json PATH]`` prints the rows with their targets; ``estimate_for``
gives the GPU check a row's estimate from the last report built.
"""

from .hardware import H100, Gpu
from .report import build, estimate_for, format_table, write_json

__all__ = ["H100", "Gpu", "build", "estimate_for", "format_table", "write_json"]
