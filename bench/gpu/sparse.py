"""gpu_check step ``speed``, the block-sparse Linear rows: ``speed.linear.*`` (the kernel and
torch BSR over F.linear on Swin-B's Linears) and issue 14's break-even sweep
``speed.breakeven.s3_mlp.{fp16,bf16}.*`` (bench/breakeven.py's curves; each row's value its
break-even sparsity, its ``points`` the curve gpu.report draws as breakeven_gpu.png).
``sp`` is the step's Speed (rows, timer, device, dtypes)."""

from __future__ import annotations

import traceback

# group -> (tokens per image, [(in, out)]): Swin-B's MLP and attention Linears at stages 1 and 3
LINEAR = {"s1_mlp": (3136, [(128, 512), (512, 128)]), "s1_attn": (3136, [(128, 384), (128, 128)]),
          "s3_mlp": (196, [(512, 2048), (2048, 512)]), "s3_attn": (196, [(512, 1536), (512, 512)])}
TINY_LINEAR = {"s1_mlp": (64, [(64, 128), (128, 64)]), "s1_attn": (64, [(64, 192), (64, 64)]),
               "s3_mlp": (32, [(64, 128), (128, 64)]), "s3_attn": (32, [(64, 192), (64, 64)])}
BATCH = 128




def linear(sp, group: str, dt: str, combos) -> None:
    import torch
    import torch.nn.functional as F

    import dimap_fast.nn as dnn
    from dimap_fast.kernels import block_sparse_linear, pack_block_sparse

    tokens, shapes = (TINY_LINEAR if sp.dry else LINEAR)[group]
    m = tokens if sp.dry else BATCH * tokens
    dtype = sp.dtypes[dt]
    g = torch.Generator().manual_seed(0)
    xs = {k: torch.randn(m, k, device=sp.dev, dtype=dtype) for k in {k for k, _ in shapes}}
    ws = {(k, n): (torch.randn(n, k, generator=g) * k ** -0.5).to(sp.dev, dtype) for k, n in shapes}
    bs = {n: torch.zeros(n, device=sp.dev, dtype=dtype).normal_(0, 0.1) for _, n in shapes}
    with torch.inference_mode():
        dense = sum(sp.timer.ms(lambda k=k, n=n: F.linear(xs[k], ws[k, n], bs[n])) for k, n in shapes)
        for block, ratio in combos:
            name = f"speed.linear.{group}.{dt}.b{block}.t{round(ratio * 100)}"
            with sp.rows.row(name, "x") as c:
                sparse, bsr, how = 0.0, 0.0, None
                for k, n in shapes:
                    w = dnn.zero_smallest_tiles_(ws[k, n].clone(), ratio, block)
                    packed = pack_block_sparse(w, block)
                    sparse += sp.timer.ms(lambda: block_sparse_linear(xs[k], packed, bs[n]))
                    if bsr is None:
                        continue
                    try:
                        how, fn = _torch_bsr(w, bs[n], block, xs[k])
                        bsr += sp.timer.ms(lambda: fn(xs[k]))
                    except Exception as exc:  # noqa: BLE001 - torch's BSR support varies by dtype
                        how, bsr = f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:80]}", None
                c.value = dense / sparse
                b_txt = (f"torch BSR {how}" if bsr is None
                         else f"torch BSR ({how}) {bsr:.3f} ms = {dense / bsr:.2f}x")
                c.note = (f"sparse {sparse:.3f} ms, F.linear {dense:.3f} ms, {b_txt}; {m} rows, "
                          f"{' + '.join(f'{k}->{n}' for k, n in shapes)}")
    del xs, ws
    sp._free()


def breakeven(sp, dt: str) -> None:
    """Speed-up over F.linear vs tile sparsity on Swin-B's stage-3 MLP, per block size, for the
    block-sparse kernel and torch BSR (and 2:4 at 50%): one row per curve, its value the
    break-even sparsity, its points in the row (gpu.report draws breakeven_gpu.png)."""
    import torch

    import breakeven as be
    from .context import error_line

    tokens, shapes = (TINY_LINEAR if sp.dry else LINEAR)["s3_mlp"]
    m, dtype = (tokens if sp.dry else BATCH * tokens), sp.dtypes[dt]
    grid = (0.0, 0.5, 0.9) if sp.dry else tuple(sorted(set(be.SPARSITIES + (0.75,))))
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(m, k, generator=g).to(sp.dev, dtype) for k, _ in shapes]
    prefix = f"speed.breakeven.s3_mlp.{dt}"
    shape_txt = f"{m} rows, {' + '.join(f'{k}->{n}' for k, n in shapes)}"
    with torch.inference_mode(), sp._backend():
        t_dense = sp.timer.ms(be.dense_fn(be.tiled_weights(0.0, 16, dtype, sp.dev, shapes), xs))
        for block in be.BLOCKS:
            for cand in ("ours", "torch_bsr"):
                name, points = f"{prefix}.b{block}.{cand}", {}
                try:
                    how = (be.pick_bsr_way(block, dtype, sp.dev, xs, sp.timer.sync, shapes)
                           if cand == "torch_bsr" else "Triton kernel")
                    for s in grid:
                        layers = be.tiled_weights(s, block, dtype, sp.dev, shapes)
                        fn = (be.ours_fn(layers, block, xs) if cand == "ours"
                              else be.bsr_fn(layers, block, how, xs))
                        points[s] = t_dense / sp.timer.ms(fn)
                except Exception as exc:  # noqa: BLE001 - an info row: the error is its result
                    traceback.print_exc()
                    sp.rows.add(name, None, "tile sparsity", f"{cand}; {shape_txt}", error_line(exc))
                    continue
                even = be.break_even(points)
                curve = ", ".join(f"{s:.0%} {v:.2f}x" for s, v in points.items())
                _add_row(sp.rows, name, even, "tile sparsity",
                         f"{how}; break-even {be.fmt_break_even(even)}; speed-up {curve}; F.linear "
                         f"{t_dense:.3f} ms; {shape_txt}", {f"{s:g}": v for s, v in points.items()})
        try:
            sparse, dense = be.two_four_fn(dtype, sp.dev, xs, shapes)
            value, note = sp.timer.ms(dense) / sp.timer.ms(sparse), f"to_sparse_semi_structured; {shape_txt}"
            _add_row(sp.rows, f"{prefix}.two_four", value, "x", note, {"0.5": value})
        except Exception as exc:  # noqa: BLE001 - needs sm80+ and torch's fp16/bf16 2:4 kernels
            sp.rows.add(f"{prefix}.two_four", None, "x", f"2:4 at 50%; {shape_txt}", error_line(exc))
    del xs
    sp._free()


def _add_row(rows, name: str, value, unit: str, note: str, points: dict) -> None:
    """``rows.add`` plus the curve's points ({sparsity: speed-up}), which the report draws."""
    rows._write({"name": name, "value": value, "unit": unit, "note": note, "points": points})
    print(f"  {name} = {value} {unit}  ({note})", flush=True)


def _torch_bsr(w, bias, block: int, x):
    """(how, fn): the first way torch multiplies by a BSR weight here that gives F.linear's result."""
    import torch
    import torch.nn.functional as F

    bsr = w.to_sparse_bsr((block, block))
    ways = [("F.linear", lambda x: F.linear(x, bsr, bias)),
            ("torch.sparse.mm", lambda x: torch.sparse.mm(bsr, x.t()).t() + bias),
            ("torch.addmm", lambda x: torch.addmm(bias[:, None], bsr, x.t()).t())]
    want = F.linear(x[:256].float(), w.float(), bias.float())
    last = None
    for how, fn in ways:
        try:
            got = fn(x)[:256].float()
        except Exception as exc:  # noqa: BLE001
            last = exc
            continue
        if float((got - want).norm() / want.norm()) < 2e-2:
            return how, fn
        last = RuntimeError(f"{how} gives a different result")
    raise last
