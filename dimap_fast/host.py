"""The machine a measurement or a measured choice belongs to: CPU model, ISA, cache folder."""

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine())
    except OSError:
        return platform.processor() or platform.machine()


def isa() -> str:
    """The widest x86 vector extension the CPU reports (sorts and GEMMs change speed with it)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(ln.split(":", 1)[1].split()) for ln in f if ln.startswith("flags")), set())
    except OSError:
        flags = set()
    for name, flag in (("AVX-512", "avx512f"), ("AVX2", "avx2"), ("AVX", "avx")):
        if flag in flags:
            return name
    return platform.machine()


def cache_dir() -> Path:
    """Where measured choices are kept between runs (DIMAP_FAST_CACHE_DIR, else the XDG cache)."""
    if os.environ.get("DIMAP_FAST_CACHE_DIR"):
        return Path(os.environ["DIMAP_FAST_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dimap_fast"


def describe() -> str:
    """One line naming the machine, for a measured figure: CPU (and GPU), cores, library versions."""
    import numpy as np
    import torch

    where = f"{cpu_model()} ({isa()}), {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    if torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name()}; host {where}"
    return f"{where}; torch {torch.__version__}, numpy {np.__version__}, Python {platform.python_version()}"
