"""gpu_check step ``kernels``: every Triton kernel against a float64 torch reference, on real Swin
shapes (tiny ones in a dry run). One row per (kernel, shape group, dtype): the worst error of the
group. Float kernels: ||out - ref||_2 / ||ref||_2 with ref computed in float64 from the same inputs
upcast; a non-finite output is NaN (never passes). Scoring kernels: exact (counts, masks) or 1e-12.

The dtypes run in parallel processes (``--parts``): most of the time is Triton compiling one
kernel variant per (stage shape, shift, dtype), which is CPU work.
"""

from __future__ import annotations

import subprocess
import sys
import time

from .context import Ctx, Rows

VARIANTS = {"fp32_ieee": ("float32", "highest"), "fp32_tf32": ("float32", "high"), "fp16": ("float16", "highest"),
            "bf16": ("bfloat16", "highest")}
PARTS = (*VARIANTS, "scoring")
REL = "rel. L2 err"

# Swin stage shapes: (channels, heads) per stage; (window, resolutions) per input size.
FAMILIES = {"swin_ts": ((96, 3), (192, 6), (384, 12), (768, 24)),
            "swin_b": ((128, 4), (256, 8), (512, 16), (1024, 32))}
INPUTS = {224: (7, (56, 28, 14, 7)), 384: (12, (96, 48, 24, 12))}


def attention_groups(dry: bool) -> dict[str, list[tuple]]:
    """Group -> [(batch, H, W, C, heads, window, shift)]; timm drops the shift when the
    resolution equals the window, so that stage runs unshifted only."""
    if dry:
        tiny = [(1, 8, 8, 32, 2, 4, 0), (1, 8, 8, 32, 2, 4, 2)]
        return {"swin_ts_224": tiny, "swin_b_224": tiny[1:], "swin_ts_384": tiny[:1], "swin_b_384": tiny[1:],
                "padded": [(2, 6, 6, 32, 2, 4, 2), (1, 6, 10, 32, 2, 4, 0)]}
    groups = {}
    for fam, stages in FAMILIES.items():
        for img, (win, resolutions) in INPUTS.items():
            groups[f"{fam}_{img}"] = [(1 if res > 48 else 2, res, res, c, heads, win, shift)
                                      for (c, heads), res in zip(stages, resolutions)
                                      for shift in ((0, win // 2) if res > win else (0,))]
    groups["padded"] = [(2, 9, 9, 96, 3, 7, 0), (2, 9, 9, 96, 3, 7, 3), (2, 20, 20, 128, 4, 12, 0),
                        (2, 20, 20, 128, 4, 12, 6), (2, 10, 17, 96, 3, 7, 3)]
    return groups


def linear_shapes(dry: bool) -> tuple[list[tuple[int, int]], int, int]:
    """([(in, out)], block, rows of x): Swin-B's Linears (C->3C, C->C, C->4C, 4C->C)."""
    if dry:
        return [(48, 80), (80, 48)], 16, 70
    shapes = [s for c in (128, 256, 512, 1024) for s in ((c, 3 * c), (c, c), (c, 4 * c), (4 * c, c))]
    return shapes, 32, 2 * 196


def step_kernels(rows: Rows, ctx: Ctx) -> None:
    if ctx.parts is None:  # the step itself: start the parts, wait for all of them
        _run_parts(rows, ctx)
        return
    for part in ctx.parts.split(","):
        if part == "scoring":
            scoring_rows(rows, ctx)
        else:
            float_rows(rows, ctx, part)


def _run_parts(rows: Rows, ctx: Ctx) -> None:
    jobs = 1 if ctx.dry else len(PARTS)  # two CPU cores gain nothing from more processes
    split = [",".join(PARTS[i::jobs]) for i in range(jobs)]
    procs = []
    for parts in split:
        cmd = [sys.executable, "-m", "gpu", "--step", "kernels",
               "--rows", rows.path, "--work", str(ctx.work), "--deadline", f"{ctx.deadline:.1f}", "--parts", parts]
        procs.append((parts, subprocess.Popen(cmd + (["--dry-run"] if ctx.dry else []))))
    for parts, proc in procs:
        try:
            rc = proc.wait(timeout=max(1.0, ctx.left()))
        except subprocess.TimeoutExpired:
            proc.kill()  # out of time: its rows so far are in the file already
            rc = proc.wait()
        print(f"kernels part {parts}: exit {rc}", flush=True)
        if rc != 0:
            rows.failed = True


def _rel_l2(out, ref) -> float:
    import torch

    if not bool(torch.isfinite(out).all()):
        return float("nan")
    return float(torch.linalg.vector_norm(out.double() - ref) / torch.linalg.vector_norm(ref))


def _worst(errs: list[tuple[float, str]]) -> tuple[float, str]:
    bad = [e for e in errs if e[0] != e[0]]  # NaN: a non-finite output
    return bad[0] if bad else max(errs)


def _reference64(qkv, table, heads, win, shift, bias):
    """window_attention_reference on the inputs upcast to float64."""
    from dimap_fast.kernels import window_attention_reference as ref

    return ref(qkv.double(), table.double(), heads, win, shift, qkv_bias=bias.double())


def float_rows(rows: Rows, ctx: Ctx, variant: str) -> None:
    import torch

    from dimap_fast.kernels import window_attention

    dtype = getattr(torch, VARIANTS[variant][0])
    torch.set_float32_matmul_precision(VARIANTS[variant][1])  # read by the kernels at each call
    dev = "cpu" if ctx.dry else "cuda"
    g = torch.Generator().manual_seed(0)
    for group, cases in attention_groups(ctx.dry).items():
        with rows.row(f"kernels.window_attention.{group}.{variant}", REL) as c:
            t0, errs = time.time(), []
            for b, h, w, ch, heads, win, shift in cases:
                qkv = torch.randn(b, h, w, 3 * ch, generator=g).to(dev, dtype)
                table = torch.randn((2 * win - 1) ** 2, heads, generator=g).to(dev, dtype)
                bias = torch.randn(3 * ch, generator=g).to(dev, dtype)
                out = window_attention(qkv, table, heads, win, shift, qkv_bias=bias)
                ref = _reference64(qkv, table, heads, win, shift, bias)
                errs.append((_rel_l2(out, ref), f"{h}x{w} C{ch} window {win} shift {shift}"))
            c.value, where = _worst(errs)
            c.note = f"worst of {len(cases)} shapes: {where}; {time.time() - t0:.0f} s"
    linear_row(rows, ctx, variant, dtype, dev, g)


def linear_row(rows: Rows, ctx: Ctx, variant: str, dtype, dev: str, g) -> None:
    import torch
    import torch.nn.functional as F

    import dimap_fast.nn as dnn
    from dimap_fast.kernels import block_sparse_linear, pack_block_sparse, unpack_block_sparse

    shapes, block, m = linear_shapes(ctx.dry)
    with rows.row(f"kernels.block_sparse_linear.swin_b.{variant}", REL) as c:
        t0, errs = time.time(), []
        for k, n in shapes:
            w = torch.randn(n, k, generator=g) * k ** -0.5
            dnn.zero_smallest_tiles_(w, 0.5, block)
            w = w.to(dev, dtype)
            packed = pack_block_sparse(w, block)
            if not torch.equal(unpack_block_sparse(packed), w):
                raise RuntimeError(f"pack/unpack changed the {k}->{n} weight")
            x = torch.randn(2, m // 2, k, generator=g).to(dev, dtype)  # leading dims, as a model calls it
            bias = (torch.randn(n, generator=g) * 0.1).to(dev, dtype)
            out = block_sparse_linear(x, packed, bias)
            ref = F.linear(x.double(), w.double(), bias.double())
            errs.append((_rel_l2(out, ref), f"{k}->{n}, {packed.density:.0%} tiles kept"))
        c.value, where = _worst(errs)
        c.note = f"worst of {len(shapes)} shapes ({block}x{block} tiles, 50% zeroed, {m} rows): {where}; " \
                 f"{time.time() - t0:.0f} s"


def _ragged_module(dry: bool, dtype):
    """(flat weights in layer order, offsets): ragged layers with ties, zeros, an all-zero layer."""
    import torch

    sizes = ([1, 2, 7, 33, 300, 5, 1000] if dry else
             [1, 7, 300, 4096, 5, 65536, 393216, 1048576, 2359296, 33])
    g = torch.Generator().manual_seed(0)
    w = torch.randn(sum(sizes), generator=g)
    w[::7] = torch.round(w[::7] * 8) / 8  # ties
    w[::11] = 0
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    w[offsets[4]:offsets[5]] = 0  # an all-zero layer
    return w.to(dtype), offsets


def scoring_rows(rows: Rows, ctx: Ctx) -> None:
    import torch

    from dimap_fast.kernels import (apply_cutoffs, apply_cutoffs_reference, module_scores, module_scores_reference,
                                    select_keep_counts, select_keep_counts_reference)

    dev = "cpu" if ctx.dry else "cuda"
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        w, offs = _ragged_module(ctx.dry, dtype)
        bounds = offs.tolist()
        w, offsets = w.to(dev), offs.to(dev)
        # Per layer, magnitudes descending, ties by flat index: the order the plan scores in.
        mags = torch.cat([torch.sort(w[a:b].abs().float(), descending=True, stable=True).values
                          for a, b in zip(bounds[:-1], bounds[1:])])
        total = w.numel()
        note = f"{len(bounds) - 1} layers, {total} weights"
        ref = module_scores_reference(mags.to(dtype), offsets)
        with rows.row(f"kernels.module_scores.ragged.{name}", "max rel err") as c:
            got = module_scores(mags.to(dtype), offsets)
            pos = ref > 0
            rel = ((got[pos] - ref[pos]).abs() / ref[pos]).max().item() if bool(pos.any()) else 0.0
            zero_wrong = int((got[~pos] != 0).sum())
            starts = torch.zeros(total, dtype=torch.bool, device=dev)
            starts[offsets[:-1]] = True
            rises = int(((got[1:] > got[:-1]) & ~starts[1:]).sum())  # scores must never rise along ranks
            finite = bool(torch.isfinite(got).all())
            c.value = float("nan") if not finite else float("inf") if zero_wrong or rises else rel
            c.note = f"{note}; {rises} rises along ranks, {zero_wrong} nonzero where the reference is 0"
        keep = torch.tensor(sorted({0, 1, round(0.1 * total), round(0.35 * total), total // 2,
                                    round(0.55 * total), round(0.9 * total), total - 1, total}), device=dev)
        counts_ref = select_keep_counts_reference(ref, offsets, keep)
        with rows.row(f"kernels.select_keep_counts.ragged.{name}", "counts differing") as c:
            counts = select_keep_counts(ref, offsets, keep)
            c.value = int((counts.cpu() != counts_ref.cpu()).sum())
            c.note = f"{note}; {keep.numel()} keep totals from 0 to all"
        with rows.row(f"kernels.apply_cutoffs.ragged.{name}", "entries differing") as c:
            diff = 0
            for row in counts_ref[2::2].cpu().tolist():
                cut = torch.tensor([mags[a + k - 1].item() if k else float("inf") for a, k in zip(bounds, row)],
                                   dtype=torch.float32, device=dev)
                kept_want = torch.tensor(row, dtype=torch.int64, device=dev)
                w_ref, mask_ref, kept_ref = apply_cutoffs_reference(w, offsets, cut, kept_want)
                w_in = w.clone()
                mask, kept = apply_cutoffs(w_in, offsets, cut, kept_want)
                diff += int((mask != mask_ref).sum()) + int((w_in != w_ref).sum())
                diff += int((kept.cpu() != kept_ref.cpu()).sum()) + int((kept.cpu() != kept_want.cpu()).sum())
            c.value = diff
            c.note = f"{note}; {len(counts_ref[2::2])} cuts; masks, pruned weights and kept counts"
