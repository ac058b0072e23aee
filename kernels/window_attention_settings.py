"""Run-time choices of the fused window attention's launchers, read at every launch.

``bias_grad``: how the backward of windows over several tiles (12x12 at 64-token tiles) sums the
bias gradient over windows. ``"flush"`` (default): the dQ kernel adds each window's piece with
relaxed atomics. ``"sum"``: a kernel of its own sums a run of windows in registers and flushes
once, repeating the scores to do so (window_attention_backward_kernels.py says why both exist).
The GPU check times both (``speed.attn_train.swin_b384.s1.fp16.bias_sum_vs_flush``) and the
static report estimates both.
"""

from __future__ import annotations

import contextlib

BIAS_GRAD_WAYS = ("flush", "sum")
_state = {"bias_grad": "flush"}


def get_bias_grad() -> str:
    return _state["bias_grad"]


def set_bias_grad(way: str) -> None:
    """Choose how the backward sums the bias gradient: "flush" or "sum"."""
    if way not in BIAS_GRAD_WAYS:
        raise ValueError(f"unknown bias-gradient way {way!r}: choose one of "
                         f"{', '.join(BIAS_GRAD_WAYS)}")
    _state["bias_grad"] = way


@contextlib.contextmanager
def bias_grad(way: str):
    """``with bias_grad("sum"): ...`` sets the way inside the block only."""
    old = get_bias_grad()
    set_bias_grad(way)
    try:
        yield
    finally:
        set_bias_grad(old)
