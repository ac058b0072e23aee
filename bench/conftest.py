"""Benchmarks run the Triton kernels through the interpreter when no GPU is present."""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dimap_fast.speed import keep_freed_memory  # noqa: E402

# CPU timings measure the arithmetic, not glibc unmapping and re-faulting activations each pass
# (a fifth of a Swin-T forward at batch 32 here); see keep_freed_memory
keep_freed_memory()
sys.path.insert(0, os.path.dirname(__file__))
