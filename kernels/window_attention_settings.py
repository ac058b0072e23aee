"""Run-time choices of the fused window attention's launchers, read at every launch.

``bias_grad``: how the backward of windows over several tiles (12x12 at 64-token tiles) sums the
bias gradient over windows. ``"flush"`` (default): the dQ kernel adds each window's piece with
relaxed atomics. ``"sum"``: a kernel of its own sums a run of windows in registers and flushes
once, repeating the scores to do so (window_attention_backward_kernels.py says why both exist).
The GPU check times both (``speed.attn_train.swin_b384.s1.fp16.bias_sum_vs_flush``) and the
static report estimates both.

``kv_prefetch``: whether the forward of windows over several tiles keeps the next key blocks' k, v
and bias pieces in flight while a block computes. ``"off"`` (default): one pipeline stage, 128
registers and 4 blocks an SM at 12x12 (sm_90), other blocks' warps covering the loads' latency.
``"on"``: Triton pipelines the key-block loop over three stages (two blocks' copies in shared
memory), 174 registers and 2 blocks an SM. The GPU check times both
(``speed.attn.swin_b384.s1.fp16.kv_prefetch_vs_off``) and the static report estimates both.
"""

from __future__ import annotations

import contextlib

BIAS_GRAD_WAYS = ("flush", "sum")
KV_PREFETCH_WAYS = ("off", "on")
_WAYS = {"bias_grad": BIAS_GRAD_WAYS, "kv_prefetch": KV_PREFETCH_WAYS}
_state = {name: ways[0] for name, ways in _WAYS.items()}


def _set(name: str, way: str) -> None:
    if way not in _WAYS[name]:
        raise ValueError(f"unknown {name.replace('_', ' ')} way {way!r}: choose one of "
                         f"{', '.join(_WAYS[name])}")
    _state[name] = way


@contextlib.contextmanager
def _scoped(name: str, way: str):
    old = _state[name]
    _set(name, way)
    try:
        yield
    finally:
        _state[name] = old


def get_bias_grad() -> str:
    return _state["bias_grad"]


def set_bias_grad(way: str) -> None:
    """Choose how the backward sums the bias gradient: "flush" or "sum"."""
    _set("bias_grad", way)


def bias_grad(way: str):
    """``with bias_grad("sum"): ...`` sets the way inside the block only."""
    return _scoped("bias_grad", way)


def get_kv_prefetch() -> str:
    return _state["kv_prefetch"]


def set_kv_prefetch(way: str) -> None:
    """Choose whether the multi-tile forward keeps the next key blocks in flight: "off" or "on"."""
    _set("kv_prefetch", way)


def kv_prefetch(way: str):
    """``with kv_prefetch("on"): ...`` sets the way inside the block only."""
    return _scoped("kv_prefetch", way)
