"""What ``dimap-fast bench`` measures (its flags are ``cli.bench``): the block-sparse linear (and, on
CUDA, the fused window attention) over a grid of shapes and sparsities; a table, optionally a plot.

Without CUDA the CPU code paths are timed: SparseLinear on CPU is F.linear on the zero-filled
weight, so its speed-up is ~1 by design (it only promises never to be slower); the table header
says so. On CUDA the Triton kernels run in float16.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DimapError

CPU_TOKENS = 8 * 196  # 8 images of Swin's 14x14 stage-3 token map
CUDA_TOKENS = 128 * 196
# Swin stages for the window-attention rows: (name, resolution, channels, heads).
ATTN_STAGES = (("swin_t.s1", 56, 96, 3), ("swin_t.s3", 14, 384, 12), ("swin_b.s1", 56, 128, 4),
               ("swin_b.s3", 14, 512, 16))


def _timer(device):
    """best_ms(fns, reps): the best time of each function in ms, the functions taking turns."""
    from ..timing import synchronizer, time_interleaved

    def best_ms(fns, reps: int) -> list[float]:
        times = time_interleaved(dict(enumerate(fns)), reps, synchronizer(device), stat=min)
        return [times[i] * 1e3 for i in range(len(fns))]

    return best_ms


def linear_table(shapes, sparsities, block, tokens, device, dtype, reps):
    """[(shape, sparsity, dense ms, sparse ms)]: F.linear vs SparseLinear on the same weight."""
    import torch
    import torch.nn.functional as F

    from ..nn import SparseLinear, zero_smallest_tiles_

    best_ms = _timer(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    with torch.inference_mode():
        for k, n in shapes:
            x = torch.randn(tokens, k, generator=g).to(device, dtype)
            for s in sparsities:
                lin = torch.nn.Linear(k, n, device=device, dtype=dtype)
                zero_smallest_tiles_(lin.weight, s, block)
                sp = SparseLinear.from_linear(lin, block)
                dense, sparse = best_ms([lambda: F.linear(x, lin.weight, lin.bias),
                                         lambda: sp(x)], reps)
                rows.append((f"{k}x{n}", s, dense, sparse))
    return rows


def attention_table(images, device, dtype, reps):
    """[(stage, reference ms, fused ms)]: the kernel's plain-torch reference (roll, partition,
    attention, reverse from the qkv token map; it rebuilds the shift mask each call, so it is not
    timm's module: bench/test_bench_attention.py times timm's eager and SDPA paths) vs the fused
    kernel, shifted windows of 7."""
    import torch

    from ..kernels import window_attention, window_attention_reference

    best_ms = _timer(device)
    rows = []
    with torch.inference_mode():
        for name, res, c, heads in ATTN_STAGES:
            qkv = torch.randn(images, res, res, 3 * c, device=device, dtype=dtype)
            table = torch.randn(169, heads, device=device, dtype=dtype)
            bias = torch.randn(3 * c, device=device, dtype=dtype)
            shift = 3 if res > 7 else 0
            args = (qkv, table, heads, 7, shift)
            ref, fused = best_ms([lambda: window_attention_reference(*args, qkv_bias=bias),
                                  lambda: window_attention(*args, qkv_bias=bias)], reps)
            rows.append((name, ref, fused))
    return rows


def _device(want: str):
    import torch

    if want == "cuda" and not torch.cuda.is_available():
        raise DimapError("--device cuda but no CUDA device is visible: use --device cpu or auto")
    return torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")


def run_kernel_bench(args) -> int:
    """Run the ``bench`` subcommand on its parsed flags (``cli.bench``); returns the exit code."""
    import torch

    device = _device(args.device)
    if args.plot is not None:
        try:  # before any timing: a missing plotter is known in a second, not after the table
            import matplotlib  # noqa: F401
        except ImportError:
            raise DimapError("--plot needs matplotlib: pip install matplotlib, or drop --plot") from None
    on_gpu = device.type == "cuda"
    dtype = torch.float16 if on_gpu else torch.float32
    tokens = args.batch_tokens or (CUDA_TOKENS if on_gpu else CPU_TOKENS)
    reps = 20 if on_gpu else 7

    rows = linear_table(args.shapes, args.sparsities, args.block, tokens, device, dtype, reps)
    dt = str(dtype).replace("torch.", "")
    if on_gpu:
        head = (f"block-sparse linear, Triton kernel on {torch.cuda.get_device_name(device)}, "
                f"block {args.block}, {tokens} tokens, {dt}")
    else:
        head = (f"block-sparse linear, CPU code path (F.linear on the zero-filled weight: no CUDA, "
                f"so the Triton kernel is not timed), block {args.block}, {tokens} tokens, {dt}")
    print(head)
    print(f"{'shape':>12} {'sparsity':>9} {'dense ms':>10} {'sparse ms':>10} {'speed-up':>9}")
    for shape, s, dense, sparse in rows:
        print(f"{shape:>12} {s:>9.2f} {dense:>10.3f} {sparse:>10.3f} {dense / sparse:>8.2f}x")

    attn = []
    if on_gpu:
        images = max(1, tokens // 196)
        attn = attention_table(images, device, dtype, reps)
        print(f"\nwindow attention (shifted, window 7), {images} images, {dt}: the kernel's torch reference "
              f"vs fused (not timm: bench/test_bench_attention.py times timm's eager and SDPA paths)")
        print(f"{'stage':>12} {'ref ms':>10} {'fused ms':>10} {'vs ref':>9}")
        for name, ref, fused in attn:
            print(f"{name:>12} {ref:>10.3f} {fused:>10.3f} {ref / fused:>8.2f}x")

    if args.plot is not None:
        _plot(args.plot, rows, head)
        print(f"\nplot written to {args.plot}")
    return 0


def _plot(path: Path, rows, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for shape in dict.fromkeys(r[0] for r in rows):
        pts = [(s, d / sp) for sh, s, d, sp in rows if sh == shape]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=shape)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("tile sparsity")
    ax.set_ylabel("speed-up over dense")
    ax.set_title(title, fontsize=7, wrap=True)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_choices(args) -> int:
    """Fill convert's measured table for a grid (``dimap-fast bench --save-choices``), so that
    ``convert`` on this machine finds every entry instead of timing while it converts."""
    import torch

    from ..nn.format_choice import measure_table

    device = _device(args.device)
    tokens = args.batch_tokens or (CUDA_TOKENS if device.type == "cuda" else CPU_TOKENS)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    found = measure_table([(tokens, n, k) for k, n in args.shapes], densities=[1 - s for s in args.sparsities],
                          blocks=[args.block], dtype=dtype, device=device)
    print(f"convert's choice table on {found[0]['device']}, {found[0]['dtype']}, {found[0]['rows']} rows "
          "(saved; convert reads it)")
    print(f"{'out x in':>13}{'block':>7}{'density':>9}  {'chosen':<8}ms per call")
    for row in found:
        times = ", ".join(f"{k} {'-' if v is None else f'{v * 1e3:.2f}'}" for k, v in row["times"].items())
        print(f"{row['out_features']:>6} x {row['in_features']:<5}{row['block']:>6}{row['density']:>9.2f}  "
              f"{row['chosen']:<8}{times}{'  (cached)' if row['cached'] else ''}")
    return 0
