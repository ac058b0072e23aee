"""Images per second, the dense architecture beside the given model, timed in one run."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import time

import torch

from .arch import find_adapter


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(limit: int = 1 << 34) -> bool:
    """Let glibc keep freed memory for the next forward pass instead of returning it to the OS.

    By default glibc serves large blocks with a fresh mmap and unmaps them when freed, so every
    CPU forward pass faults its activations in again, page by page: 560K minor faults per Swin-T
    forward at batch 32 here, a fifth of its time (2.55 s -> 2.05 s with this). That cost follows
    activation size, not FLOPs, so it weighs most on a pruned model, whose unpruned first stage holds
    the largest activations. Raising the mmap and trim thresholds keeps freed pages in the heap (what
    preloading jemalloc or tcmalloc does). Process-wide, and the heap then stays at its peak size.
    Returns False where the C library is not glibc (nothing is changed there).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, limit))


@torch.no_grad()
def images_per_second(model: torch.nn.Module, shape, seconds: float = 2.0) -> float:
    from .train.evaluate import flush_denormals

    with flush_denormals():  # Swin's -100 window mask makes denormals: 10x slower CPU math otherwise
        return _images_per_second(model, shape, seconds)


def _images_per_second(model, shape, seconds):
    model.eval()
    x = torch.randn(shape, device=next(model.parameters()).device)
    model(x)  # warm-up: allocator, kernels, caches
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 2:
        model(x)
        done += 1
    if x.is_cuda:
        torch.cuda.synchronize()
    return done * shape[0] / (time.perf_counter() - start)


def compare_throughput(src, batch: int = 8, input_size=None) -> dict:
    """Dense base architecture vs ``src.model``, alternating so both see the same machine state."""
    from .loading import create_timm_model, demo_model_from_metadata

    keep_freed_memory()  # page faults would be timed otherwise, and they do not follow FLOPs
    model = src.model
    dense = create_timm_model(src.arch) if src.arch else demo_model_from_metadata(src.metadata)
    shape = find_adapter(model).input_shape(model, input_size, batch)
    d1, m1 = images_per_second(dense, shape), images_per_second(model, shape)
    d2, m2 = images_per_second(dense, shape), images_per_second(model, shape)
    d, m = max(d1, d2), max(m1, m2)
    return {"dense": d, "model": m, "speedup": m / d, "batch": batch, "device": str(next(model.parameters()).device)}
