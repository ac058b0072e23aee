"""A static cost model of the project's Triton kernels on an H100, read from their sm_90 code.

Each kernel is launched by its own launcher on CPU tensors as if on a GPU (the launch is recorded,
not run), compiled for sm_90 with that launch's specialization, and a few of its programs are
replayed in the interpreter for loop trip counts and bytes; ``dimap-fast bench --static`` prints
the estimates beside their targets. Every figure it gives is an estimate (constants in hardware.py).
"""

from .hardware import H100, Gpu
from .report import build, estimate_for, format_table, write_json

__all__ = ["H100", "Gpu", "build", "estimate_for", "format_table", "write_json"]
