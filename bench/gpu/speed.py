"""gpu_check step ``speed``: plan + masks, fused window attention, block-sparse linear and whole
models, each beside what it replaces. Ratios are "how many times faster" (> 1 = ours is faster).

Issue 14's rows: ``speed.e2e.{swin_b,swin_t}.fp16.*`` (batch 128) time the models of
bench/end_to_end.py, as bench/test_bench_end_to_end.py does on the CPU: shrunk at 30%/50% FLOPs
reduction and block DIMAP at 50%/75% converted on the GPU (convert's per-layer choice, where it
has one, measured there), over dense on timm's SDPA path. The Linear and break-even rows live in
gpu/sparse.py.

Fair baselines (issue 20): ``speed.model.*`` time the block-pruned model converted to the
block-sparse kernel (``choose="kernel"``) over the same model unconverted on timm's SDPA path;
the ``.vs_eager`` rows, and every row named ``fused_vs_eager``, are the eager comparison.

Timing: ``triton.testing.do_bench(..., return_mode="median")`` (CUDA events, L2 flushed before
every rep) with at least ~12 reps after warm-up; the plan, whose work syncs with the host, is
timed on the wall clock (median of 10). Jobs run targets first; every row a job would make is
named up front (``Rows.plan``), and an info job that finds the step's deadline too close reports
its rows missing with the reason, as the driver does for any planned row never written. In a dry run everything is tiny, on the CPU, under the interpreter,
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

from . import attention as attn
from . import sparse as sparse
from .models import block_prune_, sdpa_path, small_swin, timm_swin_model, tiny_state
from .context import Ctx, Rows

BATCH = 128
# stage -> (resolution, channels, heads) at 224, window 7, shift 3
ATTN = {"swin_t.s1": (56, 96, 3), "swin_t.s3": (14, 384, 12), "swin_b.s1": (56, 128, 4), "swin_b.s3": (14, 512, 16)}
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
    lin = "speed.linear.{}.{}.b{}.t{}"
    # (target?, kind, job, the rows it makes), targets first; a dry run keeps one info job of each kind
    jobs = [(True, "plan", lambda: s.plan("swin_b"), ["speed.plan.swin_b", "speed.plan.swin_b.sort_ms"]),
            (False, "plan", lambda: s.plan("swin_t"), ["speed.plan.swin_t", "speed.plan.swin_t.sort_ms"])]
    jobs += [(True, "attn", lambda st=st: s.attention(st, "fp16"),
              [f"speed.block_attn.{st}.fp16.fused_vs_{b}" for b in ("eager", "sdpa")]
              + (["speed.attn_memory_floor.swin_b.s1.fp16"] if st == "swin_b.s1" else [])) for st in ATTN]
    jobs += [(True, "linear", lambda g=g: sparse.linear(s, g, "fp16", [(64, 0.75)]), [lin.format(g, "fp16", 64, 75)])
             for g in ("s1_mlp", "s3_mlp")]
    jobs += [(True, "model", lambda m=m, d=d: s.model(m, d), [f"speed.model.{m}.{d}", f"speed.model.{m}.{d}.vs_eager"])
             for m, d in (("swin_b", "fp16"), ("swin_t", "fp16"), ("swin_b", "fp32"), ("swin_t", "fp32"))]
    jobs += [(True, "attn_train", lambda: attn.attention_train(rows, ctx, s.timer, "swin_b.s1", "fp16"),
              [f"speed.attn_train.swin_b.s1.fp16.fused_vs_{b}" for b in ("eager", "sdpa")]),
             (True, "v2_attn", lambda: attn.v2_attention(rows, ctx, s.timer, "swinv2_b.s1"),
              ["speed.v2_attn.swinv2_b.s1.fp16.fused_vs_eager"]),
             (True, "model_attn", lambda: attn.swin_b_inference(rows, ctx, s.timer),
              ["speed.model_attn.swin_b.fp16", "speed.model_attn.swin_b.fp16.vs_eager"]),
             (True, "train", lambda: attn.swin_b_training(rows, ctx, s.timer),
              ["speed.train.swin_b.fp16", "speed.train.swin_b.fp16.vs_eager", "speed.train_memory.swin_b.fp16"])]
    # issue 14's end-to-end rows last among the targets: building the pruned models plans on the host
    jobs += [(True, "e2e", lambda m=m: s.end_to_end(m), [f"speed.e2e.{m}.fp16.{v}" for v in E2E_KEYS.values()])
             for m in ("swin_b", "swin_t")]
    from dimap_fast.engine.values import TILE_SIZES

    be = [f"speed.breakeven.s3_mlp.{{}}.b{b}.{c}" for b in TILE_SIZES for c in ("ours", "torch_bsr")]
    jobs += [(False, "breakeven", lambda: sparse.breakeven(s, "fp16"),  # issue 14's plot: first of the info jobs
              [n.format("fp16") for n in be] + ["speed.breakeven.s3_mlp.fp16.two_four"])]
    jobs += [(False, "kv_prefetch", lambda: attn.kv_prefetch_forward(rows, ctx, s.timer),
              [f"speed.attn.{attn.PREFETCH_STAGE[0]}.fp16.kv_prefetch_vs_off"])]
    jobs += [(False, "attn32", lambda st=st: s.attention(st, "fp32"),
              [f"speed.block_attn.{st}.fp32.fused_vs_{b}" for b in ("eager", "sdpa")]) for st in ATTN]
    jobs += [(False, "attn_train_info", lambda st=st, d=d: attn.attention_train(rows, ctx, s.timer, st, d),
              [f"speed.attn_train.{st}.{d}.fused_vs_{b}" for b in ("eager", "sdpa")]
              + ([f"speed.attn_train.{st}.{d}.bias_sum_vs_flush"] if st in attn.BIAS_GRAD_STAGES else []))
             for st, d in (("swin_b384.s1", "fp16"), ("swin_b.s1", "bf16"), ("swin_b.s1", "fp32"))]
    rest16 = [(b, t) for b in (32, 64) for t in (0.5, 0.75) if (b, t) != (64, 0.75)]
    for g in sparse.LINEAR:
        combos = ([] if g.endswith("mlp") else [(64, 0.75)]) + rest16
        jobs.append((False, "linear16", lambda g=g, c=combos: sparse.linear(s, g, "fp16", c),
                     [lin.format(g, "fp16", b, round(t * 100)) for b, t in combos]))
    jobs += [(False, "linear32", lambda g=g: sparse.linear(s, g, "fp32", [(32, 0.75), (64, 0.75)]),
              [lin.format(g, "fp32", b, 75) for b in (32, 64)]) for g in sparse.LINEAR]
    jobs += [(False, "breakeven_bf16", lambda: sparse.breakeven(s, "bf16"),
              [n.format("bf16") for n in be] + ["speed.breakeven.s3_mlp.bf16.two_four"])]
    jobs += [(False, "compile", lambda st=st: s.compiled(st), [f"speed.block_attn.{st}.fp16.fused_vs_compile"])
             for st in ATTN]
    jobs += [(False, "model_compile", lambda: attn.swin_b_compiled(rows, ctx, s.timer),
              ["speed.model_attn.swin_b.fp16.vs_compile"])]
    seen, selected = set(), []
    for target, kind, job, names in jobs:
        if target or not ctx.dry or kind not in seen:
            selected.append((target, kind, job, names))
        seen.add(kind)
    rows.plan([n for *_, names in selected for n in names])  # a row planned and not measured is reported missing
    for target, kind, job, names in selected:
        need = INFO_RESERVE_S * (3 if "compile" in kind and not ctx.dry else 1)  # a dry run compiles nothing
        if not target and ctx.left() < need:
            for name in names:  # reported, never dropped
                rows.add(name, None, "", "missing", f"not measured: {ctx.left():.0f} s left of the step's budget, "
                                                    f"this job starts with {need} s or more")
            continue
        try:
            job()
        except Exception:  # noqa: BLE001 - outside any row: that job's rows are reported missing
            traceback.print_exc()
            rows.failed = rows.failed or target


E2E_KEYS = {"shrunk -30%": "shrunk30", "shrunk -50%": "shrunk50", "block 50%": "block50", "block 75%": "block75"}


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
        with self.rows.row(f"speed.plan.{short}.sort_ms", "ms") as c:
            from dimap_fast.engine.triton_scores import TritonScorer

            scorer = TritonScorer(dimap_fast.plan(sd, **kw).units, "dimap")
            c.value = self.timer.ms(scorer.sort_again)
            c.note = "its torch.sort calls alone, on its |w| buffer, as the plan makes them (CUDA events)"
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

    # ---- whole models ----

    def model(self, short: str, dt: str) -> None:
        """The block-pruned model converted to the block-sparse kernel over the same model on
        timm's SDPA path (the row) and on timm's eager default (the ``.vs_eager`` row)."""
        import torch

        import dimap_fast.nn as dnn

        dtype = self.dtypes[dt]
        name = f"speed.model.{short}.{dt}"
        eager_row = None
        with self.rows.row(name, "x") as c:
            if self.dry and dt in self.dry_models:  # one small Swin stands in for both models
                (c.value, c.note), eager_row = self.dry_models[dt]
            else:
                if self.dry:
                    dense, block, x = block_prune_(small_swin(16), 0.5, 16), 16, torch.randn(1, 3, 16, 16)
                else:
                    dense = block_prune_(timm_swin_model(MODELS[short]).to(self.dev), 0.5, 32)
                    block, x = 32, torch.randn(BATCH, 3, 224, 224, device=self.dev)
                dense = dense.to(self.dev, dtype)
                sdpa = sdpa_path(copy.deepcopy(dense))
                conv = dnn.convert(copy.deepcopy(dense), block=block, choose="kernel")  # the kernel, not a choice
                x = x.to(self.dev, dtype)
                with torch.inference_mode(), self._backend():
                    t_conv = self.timer.ms(lambda: conv(x))
                    t_sdpa = self.timer.ms(lambda: sdpa(x))
                    t_eager = self.timer.ms(lambda: dense(x))
                n = x.shape[0]
                c.value = t_sdpa / t_conv
                c.note = (f"timm SDPA {n / t_sdpa * 1e3:.0f} img/s, converted {n / t_conv * 1e3:.0f} img/s; "
                          f"batch {n}, 50% of {block}x{block} tiles zeroed, every prunable Linear on the kernel")
                eager_row = (t_eager / t_conv, f"eager comparison: timm eager {n / t_eager * 1e3:.0f} img/s")
                self.dry_models[dt] = (c.value, c.note), eager_row
                del dense, sdpa, conv
        if eager_row:
            self.rows.add(f"{name}.vs_eager", eager_row[0], "x", eager_row[1])
        else:
            self.rows.add(f"{name}.vs_eager", None, "x", error=f"see {name}")
        self._free()

    # ---- issue 14's end-to-end rows and break-even sweep ----

    def end_to_end(self, short: str) -> None:
        """fp16 images/s of shrunk (-30%, -50% FLOPs) and block-DIMAP converted (50%, 75%) models
        over dense on timm's SDPA path (bench/end_to_end.py builds them, as the CPU bench does)."""
        import torch

        from end_to_end import VARIANTS, build_variants, timm_model

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
            from .context import error_line

            for v in E2E_KEYS.values():
                self.rows.add(f"{prefix}.{v}", None, "x", error=error_line(exc))
            self.rows.failed = True
            return
        n = x.shape[0]
        for v in VARIANTS[1:]:
            with self.rows.row(f"{prefix}.{E2E_KEYS[v]}", "x") as c, torch.inference_mode(), self._backend():
                t = self.timer.ms(lambda m=models[v]: m(x))
                var, dense = built[v], built["dense"]
                c.value = t_dense / t
                c.note = (f"{var.how}: {n / t * 1e3:.0f} img/s, dense (SDPA) {n / t_dense * 1e3:.0f} img/s; "
                          f"{var.gflops:.3g} of {dense.gflops:.3g} GFLOPs, {var.mparams:.1f} of {dense.mparams:.1f} M "
                          f"params; batch {n}" + (f"; {var.note}" if var.note else ""))
        del models, built
        self._free()
