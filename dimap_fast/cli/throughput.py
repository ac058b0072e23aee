"""Images per second, the dense architecture beside the given model, timed in one run."""

from __future__ import annotations

import time

import torch

from ..arch import find_adapter


@torch.no_grad()
def images_per_second(model: torch.nn.Module, shape, seconds: float = 2.0) -> float:
    from ..train.evaluate import flush_denormals

    with flush_denormals():  # Swin's -100 window mask makes denormals: 10x slower CPU math otherwise
        return _images_per_second(model, shape, seconds)


def _images_per_second(model, shape, seconds):
    model.eval()
    x = torch.randn(shape, device=next(model.parameters()).device)
    model(x)  # warm-up: allocator, kernels, caches
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 2:
        model(x)
        done += 1
    if x.is_cuda:
        torch.cuda.synchronize()
    return done * shape[0] / (time.perf_counter() - start)


def compare_throughput(src, batch: int = 8, input_size=None) -> dict:
    """Dense base architecture vs ``src.model``, alternating so both see the same machine state,
    the dense one on the attention path (timm's eager or SDPA) that the model runs;
    on the CPU, for a family with drop-ins, both also converted (``dimap_fast.nn.convert``, dense
    Linears: the drop-ins' CPU inference path), as a pruned model would be deployed."""
    import copy

    from ..io.models import create_timm_model, demo_model_from_metadata
    from ..nn import convert
    from ..nn.drop_ins import drop_ins_for

    model = src.model
    dense = create_timm_model(src.arch) if src.arch else demo_model_from_metadata(src.metadata)
    check_same_attention_path(dense, model)
    shape = find_adapter(model).input_shape(model, input_size, batch)
    device = next(model.parameters()).device
    pairs = {"": (dense, model)}
    if device.type == "cpu" and drop_ins_for(find_adapter(model).name):
        pairs["_converted"] = tuple(convert(copy.deepcopy(m), choose="dense") for m in (dense, model))
    sdpa = any(getattr(m, "fused_attn", False) for m in model.modules())
    out = {"batch": batch, "device": str(device), "attention": "sdpa" if sdpa else "eager"}
    for suffix, (d_model, m_model) in pairs.items():
        d1, m1 = images_per_second(d_model, shape), images_per_second(m_model, shape)
        d2, m2 = images_per_second(d_model, shape), images_per_second(m_model, shape)
        d, m = max(d1, d2), max(m1, m2)
        out.update({f"dense{suffix}": d, f"model{suffix}": m, f"speedup{suffix}": m / d})
    return out


def check_same_attention_path(dense, model) -> None:
    """Give ``dense`` the model's ``fused_attn`` (timm's SDPA switch) module by module: a shrunk or
    loaded model runs SDPA, and a dense model left on timm's eager default would flatter it."""
    flags = {name: m.fused_attn for name, m in model.named_modules() if hasattr(m, "fused_attn")}
    fallback = any(flags.values())  # a module the model lacks by name: SDPA if the model uses it anywhere
    for name, m in dense.named_modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = flags.get(name, fallback)
