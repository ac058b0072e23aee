"""The Swin v1 block's CPU inference path: the same block, computed a few images at a time.

timm's block runs each step on the whole batch: at Swin-T's first stage (100K tokens x 96
channels at batch 32) every step streams tens of megabytes through memory, and the stage runs at
about a third of the GEMM rate of the late stages (54 vs 180 GFLOP/s on the project's 2-vCPU VM,
torch profiler). That stage is where a pruned Swin's time does not fall with its FLOPs: DIMAP
prunes the late stages hardest, so what is left is dominated by the first.

Here a block is computed on chunks of about ``ROWS`` tokens (whole images), so a chunk's
intermediates (at most ROWS x 4C floats) stay in the cache between steps, and with fewer passes:

- shift and window partition are one gather of the normed tokens (a precomputed token order),
  window reverse and reverse shift one gather back: no roll, partition or reverse copies;
- the relative position bias and the shift mask are added once, per window, and cached;
- on chunks of at most ``EPILOGUE_ROWS`` tokens the Linears run oneDNN's Linear with its epilogue
  (fc1: + bias, GELU; proj and fc2: + residual, ``torch.ops.mkldnn._linear_pointwise``); on
  larger chunks they run torch's Linear, the residual added in place.

It runs only where nothing can tell it from timm's forward but the time: float32 CPU tensors,
eval mode, no gradients recorded, no autocast, backend "auto", eager (not under TorchScript,
torch.compile or torch.fx tracing, which keep timm's code), no padding. Logits agree with timm's
to float rounding (tests/nn/test_cpu_inference.py). A Linear swapped for a sparse format runs as
its own module, the epilogue done after it.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Format, Mlp

from .backend import get_backend, recording

ROWS = 3136  # tokens per chunk: one 56x56 map (Swin-T's first stage); later stages take whole images
# oneDNN's fused Linear only pays on chunks this small (one 7x7 map): side by side with F.linear
# in whole stages on the project's 2-vCPU VM it was 1.10x at 49 tokens, 0.95-0.98x at 98 and
# 0.8-0.9x from 196 up (Swin-T/B, weights streamed as in a forward, not hot in the cache).
EPILOGUE_ROWS = 64
_cache: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


class OnCpuPath:
    """Mixin before a timm class: ``forward`` runs ``_cpu_forward`` where ``_cpu_path(x)`` says
    so, else timm's forward (``_timm_forward``: the subclass names all three). No annotations
    here: TorchScript reads a module's attribute types from the first class of its bases that has
    some, which must be timm's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._timm_forward(x)
        if self._cpu_path(x):
            return self._cpu_forward(x)
        return self._timm_forward(x)


def runs(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``block``'s forward on ``x`` takes this path (else timm's forward runs)."""
    if not eligible(block, x):
        return False
    (wh, ww), (_, h, w, _) = block.window_size, x.shape
    if h % wh or w % ww or not isinstance(block.mlp, Mlp):
        return False
    mask = None if getattr(block, "dynamic_mask", False) else block.attn_mask
    return mask is None or mask.shape[0] == (h // wh) * (w // ww)


def eligible(module: nn.Module, x: torch.Tensor) -> bool:
    """What every module on this path asks: eager float32 CPU inference that no hook, autograd,
    autocast or backend choice could tell from timm's forward."""
    if torch.compiler.is_compiling() or isinstance(x, torch.fx.Proxy):
        return False
    if (x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 or module.training
            or get_backend() != "auto" or torch.is_autocast_enabled("cpu")
            or not torch.backends.mkldnn.is_available()):
        return False
    return not recording(x, module.parameters()) and not _hooked(module)


def embeds(embed: nn.Module, x: torch.Tensor) -> bool:
    """Whether timm's PatchEmbed ``embed`` runs here on the images ``x``: a patchify convolution
    (kernel = stride, no padding) to NHWC, on a size it takes without padding."""
    if not eligible(embed, x):
        return False
    conv, (_, _, h, w) = embed.proj, x.shape
    if not (type(conv) is nn.Conv2d and conv.kernel_size == conv.stride
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
            and not embed.flatten and embed.output_fmt == Format.NHWC):
        return False
    if embed.img_size is not None and embed.strict_img_size and (h, w) != tuple(embed.img_size):
        return False  # timm's forward says what is wrong
    return h % conv.stride[0] == 0 and w % conv.stride[1] == 0


def embed_forward(embed: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's PatchEmbed forward as a GEMM on patches (a 3-channel convolution runs at a fraction
    of the GEMM rate), a few images at a time."""
    conv = embed.proj
    (ph, pw), (b, c, h, w) = conv.stride, x.shape
    weight = conv.weight.reshape(conv.out_channels, -1)  # (out, c * ph * pw): the patch's order
    out = x.new_empty(b, h // ph, w // pw, conv.out_channels)
    step = max(1, ROWS // ((h // ph) * (w // pw)))
    for start in range(0, b, step):
        chunk = x[start:start + step]
        patches = chunk.reshape(-1, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(chunk.shape[0], h // ph, w // pw, -1)
        out[start:start + step] = embed.norm(F.linear(patches, weight, conv.bias))
    return out


def in_chunks(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's forward of ``module`` (image-wise, on (B, H, W, C)) a few images at a time."""
    step = max(1, ROWS // (x.shape[1] * x.shape[2]))
    if step >= x.shape[0]:
        return module._timm_forward(x)
    return torch.cat([module._timm_forward(x[s:s + step]) for s in range(0, x.shape[0], step)])


def _hooked(block: nn.Module) -> bool:
    """Whether a forward hook waits on one of the block's modules (convert's row count, a user's
    feature hook): this path runs the Linears and the attention without calling their modules."""
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in block.modules() if m is not block)


def forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's SwinTransformerBlock.forward on ``x`` (B, H, W, C), in chunks of whole images."""
    b, h, w, c = x.shape
    order, inverse, bias = _geometry(block, x)
    tokens = x.reshape(b, h * w, c)
    step = max(1, ROWS // (h * w))
    if step >= b:  # one chunk: no copy into an output
        return _block(block, tokens, order, inverse, bias).view(b, h, w, c)
    out = torch.empty_like(tokens)
    for start in range(0, b, step):
        out[start:start + step] = _block(block, tokens[start:start + step], order, inverse, bias)
    return out.view(b, h, w, c)


def _block(block, tokens, order, inverse, bias):
    windows = block.norm1(tokens)
    if order is not None:
        windows = windows.index_select(1, order)
    mixed = _attention(block, windows, bias, inverse, tokens)
    return _mlp(block.mlp, block.norm2(mixed), mixed)


def _attention(block, windows, bias, inverse, residual):
    """residual + the block's attention half, for tokens already in window order."""
    attn = block.attn
    n = bias.shape[-1]
    heads = attn.num_heads
    qkv = _linear(attn.qkv, windows)
    images = windows.shape[0]
    qkv = qkv.view(-1, n, 3, heads, qkv.shape[-1] // (3 * heads)).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if images > 1 and bias.shape[0] > 1:  # one mask per window, the same for every image
        bias = bias.unsqueeze(0).expand(images, -1, -1, -1, -1).reshape(-1, heads, n, n)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    o = o.transpose(1, 2).reshape(images, windows.shape[1], -1)
    if inverse is not None:
        o = o.index_select(1, inverse)
    return _linear(attn.proj, o, residual=residual)


def _mlp(mlp, x, residual):
    """residual + mlp(x)."""
    act = mlp.act
    if isinstance(act, nn.GELU) and isinstance(mlp.norm, nn.Identity):
        hidden = _linear(mlp.fc1, x, gelu=act.approximate)
    else:
        hidden = mlp.norm(act(mlp.fc1(x)))
    return _linear(mlp.fc2, hidden, residual=residual)


def _linear(layer, x, gelu=None, residual=None):
    """layer(x), then GELU or + residual: in oneDNN's epilogue when ``layer`` is an nn.Linear on
    at most EPILOGUE_ROWS tokens."""
    if type(layer) is nn.Linear and x.shape[:-1].numel() <= EPILOGUE_ROWS:
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, layer.weight, layer.bias, "add")
        if gelu is not None:
            return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "gelu", [], gelu)
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")
    y = layer(x)
    if gelu is not None:
        return F.gelu(y, approximate=gelu)
    if residual is None:
        return y
    return y.add_(residual) if type(layer) is nn.Linear else y + residual  # only F.linear's is ours


def _geometry(block, x):
    """(token order, its inverse, bias + mask per window), cached per block until the map size,
    bias table or mask change; the orders are None where no gather is needed."""
    attn = block.attn
    table = attn.relative_position_bias_table
    dynamic = getattr(block, "dynamic_mask", False)  # a mask made for each map size: key on the size
    mask = None if dynamic else block.attn_mask
    key = (x.shape[1], x.shape[2], tuple(block.window_size), tuple(block.shift_size),
           table.data_ptr(), table._version,
           None if mask is None else (mask.data_ptr(), mask._version))
    found = _cache.get(block)
    if found is not None and found[0] == key:
        return found[1:]
    if dynamic:
        mask = block.get_attn_mask(x)
    order = window_order(x.shape[1], x.shape[2], block.window_size, block.shift_size)
    identity = torch.arange(order.numel())
    inverse = torch.empty_like(order)
    inverse[order] = identity
    if torch.equal(order, identity):  # the map is one row of unshifted windows: no gather
        order = inverse = None
    n = block.window_size[0] * block.window_size[1]
    bias = attn._get_rel_pos_bias()  # (1, heads, n, n)
    if mask is not None:
        bias = mask.view(-1, 1, n, n).to(bias.dtype) + bias  # (windows, heads, n, n)
    _cache[block] = (key, order, inverse, bias.to(x.dtype).contiguous())
    return _cache[block][1:]


def window_order(h: int, w: int, window, shift) -> torch.Tensor:
    """For each token of the shifted map's window partition (window-major, row-major inside),
    the index of the token of the (h, w) map it comes from: torch.roll by -shift, then timm's
    window_partition, as one gather."""
    rows = (torch.arange(h) + shift[0]) % h
    cols = (torch.arange(w) + shift[1]) % w
    source = rows[:, None] * w + cols[None, :]
    return source.view(h // window[0], window[0], w // window[1], window[1]).transpose(1, 2).reshape(-1)
