"""Timing candidates side by side: the one timer of measured choices and kernel benches."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronizer(device) -> Callable[[], None]:
    """What waits for ``device``'s queued work (CUDA), or nothing (the CPU runs in order)."""
    device = torch.device(device)
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def time_interleaved(fns: dict, reps: int = 5, sync=lambda: None, warmup: bool = True,
                     give_up: float | None = None, stat=statistics.median) -> dict[str, float]:
    """Median (``stat``) seconds per call of each fn: one untimed warmup each, then ``reps`` rounds that
    take the candidates in rotating order (so drift in the machine's load hits all alike). With
    ``give_up``, a candidate whose fastest call is that many times the best median stops being
    timed (it cannot win; its median so far is returned): slow formats cost one call, not reps."""
    if warmup:
        for f in fns.values():
            f()
        sync()
    names = list(fns)
    samples = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t0 = time.perf_counter()
            fns[n]()
            sync()
            samples[n].append(time.perf_counter() - t0)
        if give_up is not None:
            best = min(statistics.median(s) for s in samples.values())
            names = [n for n in names if min(samples[n]) <= give_up * best]
    return {n: stat(s) for n, s in samples.items()}
