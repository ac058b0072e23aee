"""gpu_check step ``speed``: plan + masks, fused window attention, block-sparse linear and whole
models, each beside what it replaces. Ratios are "how many times faster" (> 1 = ours is faster).

Issue 14's rows: ``speed.e2e.{swin_b,swin_t}.fp16.*`` (batch 128) time the models of
bench/end_to_end.py, as bench/test_bench_end_to_end.py does on the CPU: shrunk at 30%/50% FLOPs
reduction and block DIMAP at 50%/75% converted on the GPU (convert's per-layer choice, where it
has one, measured there), over dense on timm's SDPA path. ``speed.breakeven.s3_mlp.{fp16,bf16}.*``
sweep tile sparsity per block size for the block-sparse kernel and torch BSR, plus 2:4 at 50%
(bench/breakeven.py): each row's value is its break-even sparsity (None: never), its ``points``
the curve that gpu_check_report draws as breakeven_gpu.png in the report folder.

Timing: ``triton.testing.do_bench(..., return_mode="median")`` (CUDA events, L2 flushed before
every rep) with at least ~12 reps after warm-up; the plan, whose work syncs with the host, is
timed on the wall clock (median of 10). Jobs run targets first; an info job is skipped once the
step's deadline is too close. In a dry run everything is tiny, on the CPU, under the interpreter,
timed once with time.perf_counter, and only one info job of each kind runs: the rows exist, their
values mean nothing.

Window attention scope, in every ``speed.block_attn.*`` row: timm's SwinTransformerBlock._attn
(roll, pad, partition, qkv Linear, attention, proj, reverse, roll back) against the same work
fused: qkv Linear on the token map + window_attention kernel + proj, as dimap_fast.nn.SwinBlock
runs it. The note gives the kernel alone too.
"""

from __future__ import annotations

import copy
import statistics
import time
import traceback

import gpu_check_attention as attn
from gpu_check_steps import Ctx, Rows, block_prune_, small_swin, timm_swin_model, tiny_state

BATCH = 128
# stage -> (resolution, channels, heads) at 224, window 7, shift 3
ATTN = {"swin_t.s1": (56, 96, 3), "swin_t.s3": (14, 384, 12), "swin_b.s1": (56, 128, 4), "swin_b.s3": (14, 512, 16)}
# group -> (tokens per image, [(in, out)]): Swin-B's MLP and attention Linears at stages 1 and 3
LINEAR = {"s1_mlp": (3136, [(128, 512), (512, 128)]), "s1_attn": (3136, [(128, 384), (128, 128)]),
          "s3_mlp": (196, [(512, 2048), (2048, 512)]), "s3_attn": (196, [(512, 1536), (512, 512)])}
TINY_LINEAR = {"s1_mlp": (64, [(64, 128), (128, 64)]), "s1_attn": (64, [(64, 192), (64, 64)]),
               "s3_mlp": (32, [(64, 128), (128, 64)]), "s3_attn": (32, [(64, 192), (64, 64)])}
MODELS = {"swin_t": "swin_tiny_patch4_window7_224", "swin_b": "swin_base_patch4_window7_224"}
INFO_RESERVE_S = 25  # an info job starts only with this much time left (torch.compile: 3x)


class Timer:
    def __init__(self, ctx: Ctx):
        import torch

        self.dry = ctx.dry
        self.sync = (lambda: None) if ctx.dry else torch.cuda.synchronize

    def ms(self, fn) -> float:
        """Median milliseconds of ``fn`` (after its first call, which compiles and tunes)."""
        if self.dry:  # one call: the interpreter is slow and the number means nothing anyway
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        fn()
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        est = (time.perf_counter() - t0) * 1e3
        from triton.testing import do_bench

        return do_bench(fn, warmup=max(25.0, 3 * est), rep=min(max(100.0, 12 * est), 3000.0), return_mode="median")

    def wall_ms(self, fn, reps: int = 10) -> float:
        for _ in range(0 if self.dry else 2):
            fn()
        times = []
        for _ in range(1 if self.dry else reps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def step_speed(rows: Rows, ctx: Ctx) -> None:
    import torch

    torch.set_float32_matmul_precision("highest")  # fp32 rows: torch's default, no TF32
    s = Speed(rows, ctx)
    # (target?, kind, job), targets first; a dry run keeps one info job of each kind
    jobs = [(True, "plan", lambda: s.plan("swin_b")), (False, "plan", lambda: s.plan("swin_t"))]
    jobs += [(True, "attn", lambda st=st: s.attention(st, "fp16")) for st in ATTN]
    jobs += [(True, "linear", lambda g=g: s.linear(g, "fp16", [(64, 0.75)])) for g in ("s1_mlp", "s3_mlp")]
    jobs += [(True, "model", lambda m=m, d=d: s.model(m, d)) for m, d in (("swin_b", "fp16"), ("swin_t", "fp16"),
                                                                           ("swin_b", "fp32"), ("swin_t", "fp32"))]
    jobs += [(True, "attn_train", lambda: attn.attention_train(rows, ctx, s.timer, "swin_b.s1", "fp16")),
             (True, "v2_attn", lambda: attn.v2_attention(rows, ctx, s.timer, "swinv2_b.s1")),
             (True, "model_attn", lambda: attn.swin_b_inference(rows, ctx, s.timer)),
             (True, "train", lambda: attn.swin_b_training(rows, ctx, s.timer))]
    # issue 14's end-to-end rows last among the targets: building the pruned models plans on the host
    jobs += [(True, "e2e", lambda m=m: s.end_to_end(m)) for m in ("swin_b", "swin_t")]
    jobs += [(False, "breakeven", lambda: s.breakeven("fp16"))]  # issue 14's plot: first of the info jobs
    jobs += [(False, "attn32", lambda st=st: s.attention(st, "fp32")) for st in ATTN]
    jobs += [(False, "attn_train_info", lambda st=st, d=d: attn.attention_train(rows, ctx, s.timer, st, d))
             for st, d in (("swin_b384.s1", "fp16"), ("swin_b.s1", "bf16"), ("swin_b.s1", "fp32"))]
    rest16 = [(b, t) for b in (32, 64) for t in (0.5, 0.75) if (b, t) != (64, 0.75)]
    jobs += [(False, "linear16", lambda g=g: s.linear(g, "fp16", ([] if g.endswith("mlp") else [(64, 0.75)]) + rest16))
             for g in LINEAR]
    jobs += [(False, "linear32", lambda g=g: s.linear(g, "fp32", [(32, 0.75), (64, 0.75)])) for g in LINEAR]
    jobs += [(False, "breakeven_bf16", lambda: s.breakeven("bf16"))]
    jobs += [(False, "compile", lambda st=st: s.compiled(st)) for st in ATTN]
    seen = set()
    for target, kind, job in jobs:
        if not target and ctx.dry and kind in seen:
            continue
        seen.add(kind)
        if not target and ctx.left() < INFO_RESERVE_S * (3 if kind == "compile" else 1):
            print(f"skipping an info job: {ctx.left():.0f} s left", flush=True)
            continue
        try:
            job()
        except Exception:  # noqa: BLE001 - outside any row: that job's rows are reported missing
            traceback.print_exc()
            rows.failed = rows.failed or target


class Speed:
    def __init__(self, rows: Rows, ctx: Ctx):
        import torch

        self.rows, self.ctx, self.dry = rows, ctx, ctx.dry
        self.dev = "cpu" if ctx.dry else "cuda"
        self.timer = Timer(ctx)
        self.fused_ms = {}  # (stage, dtype) -> fused ms, for the torch.compile rows
        self.dry_models = {}  # dtype -> (value, note): a dry run times its one small model once
        self.dtypes = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
        self.dry_e2e = None  # a dry run builds its one small Swin's variants once, for both models

    def _backend(self):
        import contextlib

        import dimap_fast.nn as dnn

        # On CUDA the default ("auto") is what users get; on the CPU it would run torch, so force.
        return dnn.backend("triton") if self.dry else contextlib.nullcontext()

    def _free(self) -> None:
        if not self.dry:
            import torch

            torch.cuda.empty_cache()

    # ---- plan + masks ----

    def plan(self, short: str) -> None:
        import dimap_fast

        with self.rows.row(f"speed.plan.{short}", "ms") as c:
            if self.dry:
                sd, kw = tiny_state(1), {"backend": "triton"}
            else:
                sd, kw = {k: v.cuda() for k, v in timm_swin_model(MODELS[short]).state_dict().items()}, {}
            c.value = self.timer.wall_ms(lambda: dimap_fast.plan(sd, **kw).masks(0.5))
            c.note = "plan(state dict).masks(0.5), fp32 weights; wall clock, median of 10 (host syncs inside)"
        self._free()

    # ---- window attention ----

    def _attention_case(self, stage: str, dtype):
        import torch
        from timm.models.swin_transformer import SwinTransformerBlock

        res, c, heads = ATTN[stage]
        batch, win, shift = BATCH, 7, 3
        if self.dry:
            batch, res, c, heads, win, shift = 1, 8, 32, 2, 4, 2
        torch.manual_seed(0)
        blk = SwinTransformerBlock(c, (res, res), num_heads=heads, window_size=win, shift_size=shift).eval()
        with torch.no_grad():
            blk.attn.relative_position_bias_table.normal_()
        blk = blk.to(self.dev, dtype)
        x = torch.randn(batch, res, res, c, device=self.dev, dtype=dtype)
        return blk, x

    def attention(self, stage: str, dt: str) -> None:
        import torch

        from dimap_fast.kernels import window_attention

        key = f"speed.block_attn.{stage}.{dt}"
        t_sdpa = t_fused = None
        with self.rows.row(f"{key}.fused_vs_eager", "x") as c, torch.inference_mode():
            eager, x = self._attention_case(stage, self.dtypes[dt])
            eager.attn.fused_attn = False  # timm 1.0's default for Swin (use_fused_attn(experimental=True))
            sdpa = copy.deepcopy(eager)
            sdpa.attn.fused_attn = True  # F.scaled_dot_product_attention with the bias + mask as attn_mask
            a = eager.attn
            qkv = a.qkv(x)

            def kernel():
                return window_attention(qkv, a.relative_position_bias_table, a.num_heads, eager.window_size,
                                        eager.shift_size, qkv_bias=a.qkv.bias, scale=a.scale)

            def fused():
                return a.proj(window_attention(a.qkv(x), a.relative_position_bias_table, a.num_heads,
                                               eager.window_size, eager.shift_size, qkv_bias=a.qkv.bias,
                                               scale=a.scale))

            want = eager._attn(x).double()
            off = float((fused().double() - want).abs().max() / want.abs().max())
            if not off <= 5e-2:  # timing a wrong result would mean nothing
                raise RuntimeError(f"fused and timm's attention differ by {off:.2e} of max |out|")
            t_eager = self.timer.ms(lambda: eager._attn(x))
            t_sdpa = self.timer.ms(lambda: sdpa._attn(x))
            t_fused = self.timer.ms(fused)
            t_kernel = self.timer.ms(kernel)
            if stage == "swin_b.s1" and dt == "fp16":
                self._memory_floor(t_kernel, qkv, kernel)
            self.fused_ms[stage, dt] = t_fused
            shape = f"batch {x.shape[0]}, {x.shape[1]}x{x.shape[2]}x{x.shape[3]}, {a.num_heads} heads"
            c.value = t_eager / t_fused
            c.note = (f"eager {t_eager:.3f} ms, SDPA {t_sdpa:.3f} ms, fused {t_fused:.3f} ms (kernel alone "
                      f"{t_kernel:.3f} ms); {shape}; fused vs eager max diff {off:.1e} of max |out|")
        if t_fused is not None:
            self.rows.add(f"{key}.fused_vs_sdpa", t_sdpa / t_fused, "x",
                          f"SDPA {t_sdpa:.3f} ms, fused {t_fused:.3f} ms")
        else:
            self.rows.add(f"{key}.fused_vs_sdpa", None, "x", error=f"see {key}.fused_vs_eager")
        self._free()

    def _memory_floor(self, t_kernel: float, qkv, kernel) -> None:
        """The kernel's time over its memory floor: qkv read once and the output written once,
        at the bandwidth a device-to-device copy reaches on this card (measured here)."""
        import torch

        with self.rows.row("speed.attn_memory_floor.swin_b.s1.fp16", "x") as c:
            n = (1 << 20) if self.dry else (1 << 30)  # 1 GiB: far past the L2
            src = torch.empty(n, dtype=torch.uint8, device=self.dev)
            dst = torch.empty_like(src)
            t_copy = self.timer.ms(lambda: dst.copy_(src))
            bandwidth = 2 * n / t_copy  # bytes per ms: a copy reads and writes every byte
            moved = qkv.numel() * qkv.element_size() * 4 // 3  # qkv in, C of its 3C channels out
            floor = moved / bandwidth
            c.value = t_kernel / floor
            c.note = (f"kernel {t_kernel:.3f} ms, floor {floor:.3f} ms ({moved / 2**20:.0f} MiB at "
                      f"{bandwidth / 1e9:.2f} TB/s, copy-measured)")
            del src, dst

    def compiled(self, stage: str) -> None:
        import torch

        with self.rows.row(f"speed.block_attn.{stage}.fp16.fused_vs_compile", "x", optional=True) as c:
            if self.dry:
                c.note = "not run in a dry run (compiles for minutes on a CPU)"
                return
            fused = self.fused_ms.get((stage, "fp16"))
            if fused is None:
                raise RuntimeError("the fused fp16 timing of this stage is missing")
            with torch.inference_mode():
                eager, x = self._attention_case(stage, torch.float16)
                eager.attn.fused_attn = False
                fn = torch.compile(eager._attn, dynamic=False)
                t0 = time.perf_counter()
                fn(x)
                took = time.perf_counter() - t0
                t = self.timer.ms(lambda: fn(x))
            c.value = t / fused
            c.note = f"torch.compile(block._attn) {t:.3f} ms (compiled in {took:.0f} s), fused {fused:.3f} ms"
        self._free()

    # ---- block-sparse linear ----

    def linear(self, group: str, dt: str, combos) -> None:
        import torch
        import torch.nn.functional as F

        import dimap_fast.nn as dnn
        from dimap_fast.kernels import block_sparse_linear, pack_block_sparse

        tokens, shapes = (TINY_LINEAR if self.dry else LINEAR)[group]
        m = tokens if self.dry else BATCH * tokens
        dtype = self.dtypes[dt]
        g = torch.Generator().manual_seed(0)
        xs = {k: torch.randn(m, k, device=self.dev, dtype=dtype) for k in {k for k, _ in shapes}}
        ws = {(k, n): (torch.randn(n, k, generator=g) * k ** -0.5).to(self.dev, dtype) for k, n in shapes}
        bs = {n: torch.zeros(n, device=self.dev, dtype=dtype).normal_(0, 0.1) for _, n in shapes}
        with torch.inference_mode():
            dense = sum(self.timer.ms(lambda k=k, n=n: F.linear(xs[k], ws[k, n], bs[n])) for k, n in shapes)
            for block, ratio in combos:
                name = f"speed.linear.{group}.{dt}.b{block}.t{round(ratio * 100)}"
                with self.rows.row(name, "x") as c:
                    sparse, bsr, how = 0.0, 0.0, None
                    for k, n in shapes:
                        w = dnn.zero_smallest_tiles_(ws[k, n].clone(), ratio, block)
                        packed = pack_block_sparse(w, block)
                        sparse += self.timer.ms(lambda: block_sparse_linear(xs[k], packed, bs[n]))
                        if bsr is None:
                            continue
                        try:
                            how, fn = _torch_bsr(w, bs[n], block, xs[k])
                            bsr += self.timer.ms(lambda: fn(xs[k]))
                        except Exception as exc:  # noqa: BLE001 - torch's BSR support varies by dtype
                            how, bsr = f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:80]}", None
                    c.value = dense / sparse
                    b_txt = (f"torch BSR {how}" if bsr is None
                             else f"torch BSR ({how}) {bsr:.3f} ms = {dense / bsr:.2f}x")
                    c.note = (f"sparse {sparse:.3f} ms, F.linear {dense:.3f} ms, {b_txt}; {m} rows, "
                              f"{' + '.join(f'{k}->{n}' for k, n in shapes)}")
        del xs, ws
        self._free()

    # ---- whole models ----

    def model(self, short: str, dt: str) -> None:
        import torch

        import dimap_fast.nn as dnn

        dtype = self.dtypes[dt]
        with self.rows.row(f"speed.model.{short}.{dt}", "x") as c:
            if self.dry and dt in self.dry_models:  # one small Swin stands in for both models
                c.value, c.note = self.dry_models[dt]
                return
            if self.dry:
                dense, block, x = block_prune_(small_swin(16), 0.5, 16), 16, torch.randn(1, 3, 16, 16)
            else:
                dense = block_prune_(timm_swin_model(MODELS[short]).to(self.dev), 0.5, 32)
                block, x = 32, torch.randn(BATCH, 3, 224, 224, device=self.dev)
            dense = dense.to(self.dev, dtype)
            conv = dnn.convert(copy.deepcopy(dense))
            x = x.to(self.dev, dtype)
            with torch.inference_mode(), self._backend():
                t_dense = self.timer.ms(lambda: dense(x))
                t_conv = self.timer.ms(lambda: conv(x))
            n = x.shape[0]
            c.value = t_dense / t_conv
            c.note = (f"dense {n / t_dense * 1e3:.0f} img/s, converted {n / t_conv * 1e3:.0f} img/s; batch {n}, "
                      f"50% of {block}x{block} tiles zeroed")
            self.dry_models[dt] = c.value, c.note
            del dense, conv
        self._free()

    # ---- issue 14's end-to-end rows and break-even sweep ----

    def end_to_end(self, short: str) -> None:
        """fp16 images/s of shrunk (-30%, -50% FLOPs) and block-DIMAP converted (50%, 75%) models
        over dense on timm's SDPA path (bench/end_to_end.py builds them, as the CPU bench does)."""
        import torch

        from end_to_end import VARIANTS, build_variants, timm_model

        keys = {"shrunk -30%": "shrunk30", "shrunk -50%": "shrunk50", "block 50%": "block50", "block 75%": "block75"}
        prefix = f"speed.e2e.{short}.fp16"
        try:
            if self.dry:  # one small Swin (block 16 fits its 32/64 widths) stands in for both models
                with self._backend():
                    self.dry_e2e = self.dry_e2e or build_variants(small_swin(16), block=16, batch=2,
                                                                  dtype=torch.float16)
                built, x = self.dry_e2e, torch.randn(2, 3, 16, 16)
            else:
                built = build_variants(timm_model(short), batch=BATCH, device=self.dev, dtype=torch.float16)
                x = torch.randn(BATCH, 3, 224, 224)
            models = {v: var.model for v, var in built.items()}
            x = x.to(self.dev, torch.float16)
            with torch.inference_mode(), self._backend():
                t_dense = self.timer.ms(lambda: models["dense"](x))
        except Exception as exc:  # noqa: BLE001 - no dense time: every row of this model says why
            traceback.print_exc()
            from gpu_check_steps import error_line

            for v in keys.values():
                self.rows.add(f"{prefix}.{v}", None, "x", error=error_line(exc))
            self.rows.failed = True
            return
        n = x.shape[0]
        for v in VARIANTS[1:]:
            with self.rows.row(f"{prefix}.{keys[v]}", "x") as c, torch.inference_mode(), self._backend():
                t = self.timer.ms(lambda m=models[v]: m(x))
                var, dense = built[v], built["dense"]
                c.value = t_dense / t
                c.note = (f"{var.how}: {n / t * 1e3:.0f} img/s, dense (SDPA) {n / t_dense * 1e3:.0f} img/s; "
                          f"{var.gflops:.3g} of {dense.gflops:.3g} GFLOPs, {var.mparams:.1f} of {dense.mparams:.1f} M "
                          f"params; batch {n}" + (f"; {var.note}" if var.note else ""))
        del models, built
        self._free()

    def breakeven(self, dt: str) -> None:
        """Speed-up over F.linear vs tile sparsity on Swin-B's stage-3 MLP, per block size, for the
        block-sparse kernel and torch BSR (and 2:4 at 50%): one row per curve, its value the
        break-even sparsity, its points in the row (gpu_check_report draws breakeven_gpu.png)."""
        import torch

        import breakeven as be
        from gpu_check_steps import error_line

        tokens, shapes = (TINY_LINEAR if self.dry else LINEAR)["s3_mlp"]
        m, dtype = (tokens if self.dry else BATCH * tokens), self.dtypes[dt]
        grid = (0.0, 0.5, 0.9) if self.dry else tuple(sorted(set(be.SPARSITIES + (0.75,))))
        g = torch.Generator().manual_seed(1)
        xs = [torch.randn(m, k, generator=g).to(self.dev, dtype) for k, _ in shapes]
        prefix = f"speed.breakeven.s3_mlp.{dt}"
        shape_txt = f"{m} rows, {' + '.join(f'{k}->{n}' for k, n in shapes)}"
        with torch.inference_mode(), self._backend():
            t_dense = self.timer.ms(be.dense_fn(be.tiled_weights(0.0, 16, dtype, self.dev, shapes), xs))
            for block in be.BLOCKS:
                for cand in ("ours", "torch_bsr"):
                    name, points = f"{prefix}.b{block}.{cand}", {}
                    try:
                        how = (be.pick_bsr_way(block, dtype, self.dev, xs, self.timer.sync, shapes)
                               if cand == "torch_bsr" else "Triton kernel")
                        for s in grid:
                            layers = be.tiled_weights(s, block, dtype, self.dev, shapes)
                            fn = (be.ours_fn(layers, block, xs) if cand == "ours"
                                  else be.bsr_fn(layers, block, how, xs))
                            points[s] = t_dense / self.timer.ms(fn)
                    except Exception as exc:  # noqa: BLE001 - an info row: the error is its result
                        traceback.print_exc()
                        self.rows.add(name, None, "tile sparsity", f"{cand}; {shape_txt}", error_line(exc))
                        continue
                    even = be.break_even(points)
                    curve = ", ".join(f"{s:.0%} {v:.2f}x" for s, v in points.items())
                    _add_row(self.rows, name, even, "tile sparsity",
                             f"{how}; break-even {be.fmt_break_even(even)}; speed-up {curve}; F.linear "
                             f"{t_dense:.3f} ms; {shape_txt}", {f"{s:g}": v for s, v in points.items()})
            try:
                sparse, dense = be.two_four_fn(dtype, self.dev, xs, shapes)
                value, note = self.timer.ms(dense) / self.timer.ms(sparse), f"to_sparse_semi_structured; {shape_txt}"
                _add_row(self.rows, f"{prefix}.two_four", value, "x", note, {"0.5": value})
            except Exception as exc:  # noqa: BLE001 - needs sm80+ and torch's fp16/bf16 2:4 kernels
                self.rows.add(f"{prefix}.two_four", None, "x", f"2:4 at 50%; {shape_txt}", error_line(exc))
        del xs
        self._free()


def _add_row(rows: Rows, name: str, value, unit: str, note: str, points: dict) -> None:
    """``rows.add`` plus the curve's points ({sparsity: speed-up}), which the report draws."""
    import json
    import os

    row = {"name": name, "value": value, "unit": unit, "note": note, "points": points}
    fd = os.open(rows.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
    finally:
        os.close(fd)
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
