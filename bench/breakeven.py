"""Break-even tile sparsity of block-sparse Linears against dense ``F.linear``: the shared core of
bench/test_bench_breakeven.py (CPU, or CUDA under pytest) and gpu/speed.py's break-even job.

Weights: Swin-B's stage-3 MLP, fc1 512->2048 then fc2 2048->512 (the stage that holds 18 of its
24 blocks); a point's time is the two Linears' sum. ``zero_smallest_tiles_`` zeroes the given
share of BxB tiles (random-init weights: in effect random tiles). Candidates, each checked
against F.linear before it is timed:
- torch BSR: ``weight.to_sparse_bsr((B, B))`` through the fastest correct call of ``F.linear``,
  ``torch.sparse.mm`` and ``torch.addmm`` (chosen once per block size and dtype, at 75%);
- ours (CUDA): dimap_fast's block-sparse Triton kernel on the packed kept tiles;
- 2:4 (CUDA, fp16/bf16, where torch supports it): ``to_sparse_semi_structured``, one point at 50%.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from dimap_fast.atomic import atomic_path
from dimap_fast.engine.values import TILE_SIZES

SHAPES = ((512, 2048), (2048, 512))  # (in, out): Swin-B stage-3 MLP
SPARSITIES = (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}  # rel. L2 vs F.linear


def tiled_weights(sparsity: float, block: int, dtype, device, shapes=SHAPES, seed: int = 0):
    """[(weight, bias)] per shape, ``sparsity`` of each weight's BxB tiles zeroed."""
    import dimap_fast.nn as dnn

    g = torch.Generator().manual_seed(seed)
    out = []
    for k, n in shapes:
        w = torch.randn(n, k, generator=g) * k ** -0.5
        dnn.zero_smallest_tiles_(w, sparsity, block)
        out.append((w.to(device, dtype), (torch.randn(n, generator=g) * 0.1).to(device, dtype)))
    return out


def _close(got, want, dtype) -> bool:
    return float((got.float() - want.float()).norm() / want.float().norm()) <= TOL[dtype]


def bsr_ways(w, bias, block: int):
    """(how, fn(x)) of every torch call that multiplies x by the BSR form of ``w``."""
    bsr = w.to_sparse_bsr((block, block))
    # addmm's result is the transposed view of a (out, rows) product: no copy, as a caller could use it
    return [("F.linear", lambda x: F.linear(x, bsr, bias)),
            ("torch.sparse.mm", lambda x: torch.sparse.mm(bsr, x.t()).t() + bias),
            ("torch.addmm", lambda x: torch.addmm(bias[:, None], bsr, x.t()).t())]


def pick_bsr_way(block: int, dtype, device, xs, sync=lambda: None, shapes=SHAPES) -> str:
    """The fastest correct torch BSR call at 75% tile sparsity (best of 2 calls each); raises
    the last error when none works for this dtype/device."""
    layers = tiled_weights(0.75, block, dtype, device, shapes)
    best, last = None, None
    for i, (how, _) in enumerate(bsr_ways(*layers[0], block)):
        fns = [bsr_ways(w, b, block)[i][1] for w, b in layers]
        try:
            if not all(_close(fn(x), F.linear(x, w, b), dtype) for fn, x, (w, b) in zip(fns, xs, layers)):
                last = RuntimeError(f"{how} differs from F.linear")
                continue
            t = min(_timed(lambda: [fn(x) for fn, x in zip(fns, xs)], sync) for _ in range(2))
        except Exception as exc:  # noqa: BLE001 - torch's sparse support varies by dtype and device
            last = exc
            continue
        if best is None or t < best[1]:
            best = how, t
    if best is None:
        raise last
    return best[0]


def dense_fn(layers, xs):
    return lambda: [F.linear(x, w, b) for (w, b), x in zip(layers, xs)]


def _timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def bsr_fn(layers, block: int, how: str, xs):
    """One callable running every layer through torch BSR with the call ``how``."""
    fns = [dict(bsr_ways(w, b, block))[how] for w, b in layers]
    for fn, x, (w, b) in zip(fns, xs, layers):
        if not _close(fn(x), F.linear(x, w, b), w.dtype):
            raise RuntimeError(f"torch BSR ({how}) differs from F.linear")
    return lambda: [fn(x) for fn, x in zip(fns, xs)]


def ours_fn(layers, block: int, xs):
    """One callable running every layer through dimap_fast's block-sparse kernel (checked)."""
    from dimap_fast.kernels import block_sparse_linear, pack_block_sparse

    packed = [(pack_block_sparse(w, block), b) for w, b in layers]
    for (p, b), x, (w, _) in zip(packed, xs, layers):
        if not _close(block_sparse_linear(x, p, b), F.linear(x, w, b), w.dtype):
            raise RuntimeError(f"the block-sparse kernel (B={block}) differs from F.linear")
    return lambda: [block_sparse_linear(x, p, b) for (p, b), x in zip(packed, xs)]


def two_four_fn(dtype, device, xs, shapes=SHAPES):
    """(2:4 fn, dense fn): weights with the two smallest of every four zeroed, through torch's
    semi-structured kernels, and the same weights through F.linear."""
    from torch.sparse import to_sparse_semi_structured

    layers = tiled_weights(0.0, 16, dtype, device, shapes)
    halved = []
    for w, b in layers:
        groups = w.view(w.shape[0], -1, 4)
        keep = groups.abs().argsort(dim=-1)[..., 2:]  # the two largest of each group of four
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
        halved.append(((groups * mask).view_as(w), b))
    sparse = [(to_sparse_semi_structured(w), b) for w, b in halved]
    for (s, b), x, (w, _) in zip(sparse, xs, halved):
        if not _close(F.linear(x, s, b), F.linear(x, w, b), dtype):
            raise RuntimeError("2:4 differs from F.linear")
    return (lambda: [F.linear(x, s, b) for (s, b), x in zip(sparse, xs)],
            lambda: [F.linear(x, w, b) for (w, b), x in zip(halved, xs)])


def break_even(points: dict[float, float]):
    """The smallest measured sparsity from which the speed-up stays above 1 at every higher
    measured sparsity (one noisy win below a loss does not count); None: never."""
    found = None
    for s in sorted(points, reverse=True):
        if points[s] <= 1.0:
            break
        found = s
    return found


def fmt_break_even(s) -> str:
    return "never" if s is None else f"{s:.0%}"


def plot(panels: dict, path, title: str, marks: dict | None = None) -> None:
    """One panel per dtype (``panels``: {panel: {line label: {sparsity: speed-up}}}), as the PyTorch
    block-sparsity study draws it: speed-up over dense vs tile sparsity, 1.0 dashed. ``marks``:
    {panel: {label: (sparsity, speed-up)}} single points (2:4). Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import textwrap

    fig, axes = plt.subplots(1, len(panels), figsize=(max(7.0, 5.5 * len(panels)), 4.6), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], panels.items()):
        for label, pts in lines.items():
            xs = sorted(pts)
            ax.plot([100 * s for s in xs], [pts[s] for s in xs], marker="o", ms=3,
                    ls="--" if label.startswith("ours") else "-", label=label)
        for label, (s, v) in (marks or {}).get(panel, {}).items():
            ax.plot([100 * s], [v], marker="*", ms=12, ls="none", label=label)
        ax.axhline(1.0, color="grey", ls=":", lw=1)
        ax.set(title=panel, xlabel="tile sparsity (%)", ylabel="speed-up over dense F.linear", xlim=(0, 100))
        if not lines and not (marks or {}).get(panel):
            ax.text(0.5, 0.5, "no sparse candidate runs here", ha="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(title, 90)), fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
