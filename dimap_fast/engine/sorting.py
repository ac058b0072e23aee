"""The host's fastest sort of float32 magnitudes, measured once and cached.

The CPU plan is mostly sorting, and which sort is fastest is a property of the host, not of the
code: numpy picks its SIMD sort at import from the CPU's features, and on some AVX-512 hosts (AMD
Zen 4) its AVX-512 sort ran ~6x slower than its AVX2 sort. So the candidates are timed once, on
one thread, on a synthetic layer, and the winner is saved (with its times) in ``sort_choice.json``
in the cache directory, keyed by the CPU model, numpy's enabled CPU features and the versions.

Candidates, both usable inside this process:
- ``numpy``: np.sort of the float32 values, on whatever SIMD path numpy dispatched to;
- ``torch``: torch.sort of the float32 bits as int32 (non-negative floats order like their bits),
  torch's stable radix sort, whose speed does not depend on the SIMD width.
``DIMAP_FAST_SORT=numpy|torch`` forces one.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..atomic import save_cache
from ..host import cache_dir, cpu_model
CANDIDATES = ("numpy", "torch")
CACHE_NAME = "sort_choice.json"
PROBE = 1 << 20  # a mid-sized Swin layer: both sorts are past their fixed costs
_FORMAT = 1
_SIGN = np.uint32(1 << 31)
_chosen: dict | None = None


def cache_path() -> Path:
    return cache_dir() / CACHE_NAME


def host_key() -> str:
    """What a sort's speed depends on: CPU model, numpy's enabled SIMD features, versions."""
    from numpy._core._multiarray_umath import __cpu_features__ as features

    simd = ",".join(k for k, on in sorted(features.items()) if on and k.startswith(("AVX", "X86_V")))
    return f"{cpu_model()} | {simd} | numpy {np.__version__} | torch {torch.__version__}"


def sort_negated(neg: np.ndarray, method: str | None = None) -> None:
    """Sort -|w| (float32, sign bits all set) ascending in place, by ``method`` or the host's choice."""
    method = method or choice()["sort"]
    if method == "torch" and neg.dtype == np.float32:
        bits = neg.view(np.uint32)
        mags = torch.from_numpy(np.bitwise_xor(bits, _SIGN).view(np.int32))  # |w| as bits
        up = torch.sort(mags, stable=True).values.numpy().view(np.uint32)
        np.bitwise_or(up[::-1], _SIGN, out=bits)  # |w| descending is -|w| ascending
    else:
        neg.sort()


def choice() -> dict:
    """{"sort": the method, "why": one line}: forced, cached, or measured now (then cached)."""
    global _chosen
    forced = os.environ.get("DIMAP_FAST_SORT")
    if forced:
        if forced not in CANDIDATES:
            warnings.warn(f"DIMAP_FAST_SORT={forced!r} is not one of {CANDIDATES}; measuring instead", stacklevel=2)
        else:
            return {"sort": forced, "why": "forced by DIMAP_FAST_SORT"}
    if _chosen is None:
        key = host_key()
        times = _load().get(key)
        cached = isinstance(times, dict) and set(times) == set(CANDIDATES)
        if not cached:
            times = measure()
            _save(key, times)
        best = min(times, key=times.get)
        shown = ", ".join(f"{k} {t * 1e3:.1f} ms" for k, t in sorted(times.items(), key=lambda kv: kv[1]))
        _chosen = {"sort": best, "times": times,
                   "why": f"fastest of a {PROBE >> 20}M-float sort on one thread ({shown}; "
                          f"{'cached' if cached else 'measured now'}, {cache_path()})"}
    return _chosen


def measure(n: int = PROBE, reps: int = 3) -> dict[str, float]:
    """Best-of-reps seconds of each candidate on the same synthetic -|w|, one torch thread."""
    rng = np.random.default_rng(0)
    data = -np.abs(rng.standard_normal(n, dtype=np.float32))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for method in CANDIDATES:
            best = float("inf")
            for _ in range(reps):
                work = data.copy()
                start = time.perf_counter()
                sort_negated(work, method)
                best = min(best, time.perf_counter() - start)
            out[method] = best
        return out
    finally:
        torch.set_num_threads(threads)


def _load() -> dict:
    path = cache_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return data["entries"] if data.get("format") == _FORMAT else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # unreadable: measure again and overwrite


def _save(key: str, times: dict) -> None:
    entries = _load()
    entries[key] = times
    save_cache(cache_path(), json.dumps({"format": _FORMAT, "entries": entries}, indent=1, sort_keys=True),
               "the sort choice")
