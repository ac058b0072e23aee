"""gpu_check step ``speed``, the rows of the fused window attention that trains (issue 13).

- ``speed.attn_train.<stage>.<dtype>.fused_vs_eager``: one forward + backward of the attention
  half of a block (timm's ``_attn`` from the normed tokens, gradients to the tokens and every
  parameter) against qkv Linear + fused kernel + proj, as SwinBlock trains;
- ``speed.attn_train.swin_b384.s1.fp16.bias_sum_vs_flush``: the same step of the 12x12 stage with
  the bias gradient summed over windows by a kernel of its own against flushed per window by the
  dQ kernel (``window_attention_settings.bias_grad``: which one the backward should use);
- ``speed.attn.swin_b384.s1.fp16.kv_prefetch_vs_off``: the forward of the 12x12 stage's attention
  half (batch 128, the static report's window-12 workload) with the next key blocks kept in flight
  (three pipeline stages on the key-block loop) against one stage
  (``window_attention_settings.kv_prefetch``: which one the forward should use);
- ``speed.v2_attn.<stage>.fp16.fused_vs_eager``: SwinV2's cosine attention half, forward;
- ``speed.model_attn.swin_b.fp16``: whole Swin-B, dense weights, inference: timm on its SDPA
  path against the converted model (the fused attention alone: nothing is sparse); ``.vs_eager``
  the same against timm's eager default, ``.vs_compile`` (an info job) against
  ``torch.compile`` of timm's eager model;
- ``speed.train.swin_b.fp16`` and ``speed.train_memory.swin_b.fp16``: one training step of Swin-B
  under fp16 autocast (AdamW, batch 64): time ratio and peak-memory ratio, timm on SDPA over ours
  (> 1: ours is faster / smaller); ``.vs_eager`` the time against timm's eager default.
Every "fused_vs_sdpa" / unsuffixed row is over timm's SDPA path (``fused_attn = True``); rows
over timm's eager attention say so in their name.
A dry run makes the same rows on tiny CPU shapes under the interpreter (values mean nothing).
"""

from __future__ import annotations

import copy

from .models import sdpa_path, small_swin, timm_swin_model
from .context import Ctx, Rows

# stage -> (resolution, channels, heads, window, batch)
TRAIN_STAGES = {"swin_b.s1": (56, 128, 4, 7, 128), "swin_b384.s1": (96, 128, 4, 12, 32)}
V2_STAGES = {"swinv2_b.s1": (64, 128, 4, 8, 128)}  # swinv2_base_window8_256's first stage
TINY = (8, 32, 2, 4, 1)
TINY_BLOCKED = (12, 32, 2, 12, 1)  # a dry run of a 12x12 stage still takes several tiles a window
# stages whose windows span several tiles: the two ways to the bias gradient are timed there too
BIAS_GRAD_STAGES = ("swin_b384.s1",)
PREFETCH_STAGE = ("swin_b384.s1", (96, 128, 4, 12, 128))  # and the forward's two ways, at batch 128


def _block(cls, shape, dev, dtype, dry):
    import torch

    res, c, heads, win, batch = shape if not dry else TINY_BLOCKED if shape[3] > 8 else TINY
    torch.manual_seed(0)
    blk = cls(c, (res, res), num_heads=heads, window_size=win, shift_size=win // 2)
    x = torch.randn(batch, res, res, c)
    return blk.to(dev, dtype), x.to(dev, dtype)


def attention_train(rows: Rows, ctx: Ctx, timer, stage: str, dt: str) -> None:
    import torch
    from timm.models.swin_transformer import SwinTransformerBlock

    import dimap_fast.nn as dnn
    from dimap_fast.kernels.window_attention_settings import bias_grad

    dtype = getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dt])
    t_sdpa = t_ours = None
    with rows.row(f"speed.attn_train.{stage}.{dt}.fused_vs_eager", "x") as c:
        timm_blk, x = _block(SwinTransformerBlock, TRAIN_STAGES[stage], _dev(ctx), dtype, ctx.dry)
        ours = dnn.SwinBlock.adopt(copy.deepcopy(timm_blk))
        timm_blk.attn.fused_attn = False
        sdpa_blk = sdpa_path(copy.deepcopy(timm_blk))
        x.requires_grad_(True)
        g = torch.randn_like(x)

        def step(blk):
            def run():
                blk.zero_grad(set_to_none=True)
                x.grad = None
                blk._attn(x).backward(g)
            return run

        with _triton(ctx):
            t_ours = timer.ms(step(ours))
            if stage in BIAS_GRAD_STAGES:
                with bias_grad("sum"):
                    t_sum = timer.ms(step(ours))
                t_flush = timer.ms(step(ours))  # again, after it: the pair's two sides alternate
                rows.add(f"speed.attn_train.{stage}.{dt}.bias_sum_vs_flush", t_flush / t_sum, "x",
                         f"the bias gradient summed by its own kernel {t_sum:.3f} ms, flushed per "
                         f"window by the dQ kernel {t_flush:.3f} ms (> 1: summing wins; "
                         f"kernels.window_attention_settings.bias_grad)")
        t_timm = timer.ms(step(timm_blk))
        t_sdpa = timer.ms(step(sdpa_blk))
        c.value = t_timm / t_ours
        c.note = f"forward + backward of the attention half: timm eager {t_timm:.3f} ms, fused {t_ours:.3f} ms"
    name = f"speed.attn_train.{stage}.{dt}.fused_vs_sdpa"
    if t_sdpa is not None:
        rows.add(name, t_sdpa / t_ours, "x", f"timm SDPA {t_sdpa:.3f} ms, fused {t_ours:.3f} ms")
    else:
        rows.add(name, None, "x", error=f"see speed.attn_train.{stage}.{dt}.fused_vs_eager")


def kv_prefetch_forward(rows: Rows, ctx: Ctx, timer) -> None:
    import torch
    from timm.models.swin_transformer import SwinTransformerBlock

    import dimap_fast.nn as dnn
    from dimap_fast.kernels.window_attention_settings import kv_prefetch

    stage, shape = PREFETCH_STAGE
    with rows.row(f"speed.attn.{stage}.fp16.kv_prefetch_vs_off", "x") as c, torch.inference_mode():
        timm_blk, x = _block(SwinTransformerBlock, shape, _dev(ctx), torch.float16, ctx.dry)
        ours = dnn.SwinBlock.adopt(timm_blk)
        with _triton(ctx):
            with kv_prefetch("on"):
                t_on = timer.ms(lambda: ours._attn(x))
            t_off = timer.ms(lambda: ours._attn(x))
        c.value = t_off / t_on
        c.note = (f"forward of the attention half, batch {x.shape[0]}: the next key blocks in flight "
                  f"{t_on:.3f} ms, one stage {t_off:.3f} ms (> 1: in flight wins; "
                  f"kernels.window_attention_settings.kv_prefetch)")


def v2_attention(rows: Rows, ctx: Ctx, timer, stage: str) -> None:
    import torch
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block

    import dimap_fast.nn as dnn

    with rows.row(f"speed.v2_attn.{stage}.fp16.fused_vs_eager", "x") as c, torch.inference_mode():
        timm_blk, x = _block(SwinTransformerV2Block, V2_STAGES[stage], _dev(ctx), torch.float16,
                             ctx.dry)
        ours = dnn.convert(copy.deepcopy(timm_blk))
        with _triton(ctx):
            t_ours = timer.ms(lambda: ours._attn(x))
        t_timm = timer.ms(lambda: timm_blk._attn(x))
        c.value = t_timm / t_ours
        c.note = f"SwinV2 cosine attention half, forward: timm eager {t_timm:.3f} ms, fused {t_ours:.3f} ms"


def swin_b_inference(rows: Rows, ctx: Ctx, timer) -> None:
    import torch

    import dimap_fast.nn as dnn

    eager_row = None
    with rows.row("speed.model_attn.swin_b.fp16", "x") as c, torch.inference_mode():
        eager, x = _model(ctx, 128)
        eager, x = eager.half(), x.half()
        sdpa = sdpa_path(copy.deepcopy(eager))
        ours = dnn.convert(copy.deepcopy(eager))  # dense weights: only the attention changes
        with _triton(ctx):
            t_ours = timer.ms(lambda: ours(x))
        t_sdpa = timer.ms(lambda: sdpa(x))
        t_eager = timer.ms(lambda: eager(x))
        n = x.shape[0]
        c.value = t_sdpa / t_ours
        c.note = f"timm SDPA {n / t_sdpa * 1e3:.0f} img/s, fused attention {n / t_ours * 1e3:.0f} img/s; batch {n}"
        eager_row = t_eager / t_ours, f"eager comparison: timm eager {n / t_eager * 1e3:.0f} img/s"
    _add_or_missing(rows, "speed.model_attn.swin_b.fp16.vs_eager", eager_row)


def swin_b_compiled(rows: Rows, ctx: Ctx, timer) -> None:
    """Info: the converted Swin-B against torch.compile of timm's eager model (minutes of
    inductor on a cold machine: the last job, reported missing when no time is left)."""
    import torch

    import dimap_fast.nn as dnn

    with rows.row("speed.model_attn.swin_b.fp16.vs_compile", "x", optional=True) as c:
        if ctx.dry:
            c.note = "not run in a dry run (compiles for minutes on a CPU)"
            return
        with torch.inference_mode():
            eager, x = _model(ctx, 128)
            eager, x = eager.half(), x.half()
            ours = dnn.convert(copy.deepcopy(eager))
            compiled = torch.compile(eager, dynamic=False)
            t_compiled = timer.ms(lambda: compiled(x))
            t_ours = timer.ms(lambda: ours(x))
        c.value = t_compiled / t_ours
        c.note = f"torch.compile(timm eager) {t_compiled:.1f} ms, fused attention {t_ours:.1f} ms; batch {x.shape[0]}"


def swin_b_training(rows: Rows, ctx: Ctx, timer) -> None:
    import torch
    import torch.nn.functional as F

    import dimap_fast.nn as dnn

    measured = {}
    with rows.row("speed.train.swin_b.fp16", "x") as c:
        timm_model, x = _model(ctx, 64)
        labels = torch.randint(0, timm_model.num_classes, (x.shape[0],), device=x.device)
        for name in ("fused", "sdpa", "eager"):
            model = (dnn.convert(copy.deepcopy(timm_model)) if name == "fused" else
                     sdpa_path(copy.deepcopy(timm_model)) if name == "sdpa" else timm_model)
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

            def step(model=model, opt=opt):
                with torch.autocast(x.device.type, dtype=torch.float16 if not ctx.dry else torch.bfloat16):
                    loss = F.cross_entropy(model(x), labels)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            with _triton(ctx) if name == "fused" else _nothing():
                t = timer.ms(step)
                peak = _peak_bytes(ctx, step)
            measured[name] = (t, peak)
            del model, opt
        (t_f, p_f), (t_s, p_s), (t_e, _) = measured["fused"], measured["sdpa"], measured["eager"]
        c.value = t_s / t_f
        c.note = f"batch {x.shape[0]}, fp16 autocast, AdamW: timm SDPA {t_s:.1f} ms, fused {t_f:.1f} ms"
    have = all(k in measured for k in ("fused", "sdpa", "eager"))
    _add_or_missing(rows, "speed.train.swin_b.fp16.vs_eager",
                    (t_e / t_f, f"eager comparison: timm eager {t_e:.1f} ms") if have else None)
    _add_or_missing(rows, "speed.train_memory.swin_b.fp16",
                    (p_s / p_f if p_f else None, f"peak memory of a step: timm SDPA {p_s / 2**30:.2f} GiB, "
                     f"fused {p_f / 2**30:.2f} GiB") if have else None)


def _add_or_missing(rows: Rows, name: str, value_note) -> None:
    if value_note is None:
        rows.add(name, None, "x", error="see the row this one is measured with")
    else:
        rows.add(name, value_note[0], "x", value_note[1])


def _model(ctx: Ctx, batch: int):
    import torch

    if ctx.dry:
        return small_swin(16), torch.randn(1, 3, 16, 16)
    return timm_swin_model("swin_base_patch4_window7_224").cuda(), torch.randn(batch, 3, 224, 224,
                                                                               device="cuda")


def _peak_bytes(ctx: Ctx, step) -> int:
    import torch

    if ctx.dry:
        return 1  # no allocator statistics on the CPU: the dry row only proves the plumbing
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def _dev(ctx: Ctx) -> str:
    return "cpu" if ctx.dry else "cuda"


def _triton(ctx: Ctx):
    import dimap_fast.nn as dnn

    # CUDA's default ("auto") is what users get; on the CPU it would be torch, so force the kernels
    return dnn.backend("triton") if ctx.dry else _nothing()


def _nothing():
    import contextlib

    return contextlib.nullcontext()
