"""gpu_check step ``speed``, the rows of the fused window attention that trains (issue 13).

- ``speed.attn_train.<stage>.<dtype>.fused_vs_eager``: one forward + backward of the attention
  half of a block (timm's ``_attn`` from the normed tokens, gradients to the tokens and every
  parameter) against qkv Linear + fused kernel + proj, as SwinBlock trains;
- ``speed.v2_attn.<stage>.fp16.fused_vs_eager``: SwinV2's cosine attention half, forward;
- ``speed.model_attn.swin_b.fp16``: whole Swin-B, dense weights, inference: timm against the
  converted model (the fused attention alone: nothing is sparse);
- ``speed.train.swin_b.fp16`` and ``speed.train_memory.swin_b.fp16``: one training step of Swin-B
  under fp16 autocast (AdamW, batch 64): time ratio and peak-memory ratio, timm over ours (> 1:
  ours is faster / smaller).
A dry run makes the same rows on tiny CPU shapes under the interpreter (values mean nothing).
"""

from __future__ import annotations

import copy

from gpu_check_steps import Ctx, Rows, small_swin, timm_swin_model

# stage -> (resolution, channels, heads, window, batch)
TRAIN_STAGES = {"swin_b.s1": (56, 128, 4, 7, 128), "swin_b384.s1": (96, 128, 4, 12, 32)}
V2_STAGES = {"swinv2_b.s1": (64, 128, 4, 8, 128)}  # swinv2_base_window8_256's first stage
TINY = (8, 32, 2, 4, 1)


def _block(cls, shape, dev, dtype, dry):
    import torch

    res, c, heads, win, batch = TINY if dry else shape
    torch.manual_seed(0)
    blk = cls(c, (res, res), num_heads=heads, window_size=win, shift_size=win // 2)
    x = torch.randn(batch, res, res, c)
    return blk.to(dev, dtype), x.to(dev, dtype)


def attention_train(rows: Rows, ctx: Ctx, timer, stage: str, dt: str) -> None:
    import torch
    from timm.models.swin_transformer import SwinTransformerBlock

    import dimap_fast.nn as dnn

    dtype = getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dt])
    with rows.row(f"speed.attn_train.{stage}.{dt}.fused_vs_eager", "x") as c:
        timm_blk, x = _block(SwinTransformerBlock, TRAIN_STAGES[stage], _dev(ctx), dtype, ctx.dry)
        ours = dnn.SwinBlock.adopt(copy.deepcopy(timm_blk))
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
        t_timm = timer.ms(step(timm_blk))
        c.value = t_timm / t_ours
        c.note = f"forward + backward of the attention half: timm eager {t_timm:.3f} ms, fused {t_ours:.3f} ms"


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

    with rows.row("speed.model_attn.swin_b.fp16", "x") as c, torch.inference_mode():
        dense, x = _model(ctx, 128)
        dense, x = dense.half(), x.half()
        ours = dnn.convert(copy.deepcopy(dense))  # dense weights: only the attention changes
        with _triton(ctx):
            t_ours = timer.ms(lambda: ours(x))
        t_timm = timer.ms(lambda: dense(x))
        n = x.shape[0]
        c.value = t_timm / t_ours
        c.note = f"timm {n / t_timm * 1e3:.0f} img/s, fused attention {n / t_ours * 1e3:.0f} img/s; batch {n}"


def swin_b_training(rows: Rows, ctx: Ctx, timer) -> None:
    import torch
    import torch.nn.functional as F

    import dimap_fast.nn as dnn

    measured = {}
    with rows.row("speed.train.swin_b.fp16", "x") as c:
        timm_model, x = _model(ctx, 64)
        labels = torch.randint(0, timm_model.num_classes, (x.shape[0],), device=x.device)
        for name in ("fused", "timm"):
            model = dnn.convert(copy.deepcopy(timm_model)) if name == "fused" else timm_model
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
        (t_f, p_f), (t_t, p_t) = measured["fused"], measured["timm"]
        c.value = t_t / t_f
        c.note = f"batch {x.shape[0]}, fp16 autocast, AdamW: timm {t_t:.1f} ms, fused {t_f:.1f} ms"
    if measured.get("fused") and measured.get("timm"):
        rows.add("speed.train_memory.swin_b.fp16", p_t / p_f if p_f else None, "x",
                 f"peak memory of a step: timm {p_t / 2**30:.2f} GiB, fused {p_f / 2**30:.2f} GiB")
    else:
        rows.add("speed.train_memory.swin_b.fp16", None, "x", error="see speed.train.swin_b.fp16")


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
