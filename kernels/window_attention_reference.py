"""Window geometry, input checks and the plain-torch reference of the fused window attention.

The reference is timm's own path written out: roll, pad (the padding's q, k, v are the qkv
bias, as timm pads the normalized tokens before its qkv Linear), partition, attention with the
relative-position bias and the shifted-window mask, reverse partition, roll back. It is
differentiable, so it is also the reference of the backward kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import FLOAT_DTYPES

MASK_NEG = -100.0  # timm's value for tokens of different shifted-window regions
MAX_HEAD_DIM = 128


def pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    try:
        a, b = (int(t) for t in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    return a, b


def unsupported(head_dim: int, dtype: torch.dtype | None = None) -> str | None:
    """Why the fused kernel cannot run attention heads of ``head_dim`` channels (of ``dtype``
    activations), or None."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        return (f"{dtype} activations: the fused kernel takes float32, float16 and bfloat16; run "
                "this attention through timm's path (dimap_fast.nn backend 'torch')")
    if head_dim > MAX_HEAD_DIM:
        return (f"head dim {head_dim} is above the fused kernel's limit of {MAX_HEAD_DIM}: run "
                "this attention through timm's path (dimap_fast.nn backend 'torch')")
    return None


def check_inputs(qkv_tokens, rel_pos_table, num_heads, window_size, shift_size, qkv_bias, mask,
                 dtypes=FLOAT_DTYPES):
    if not isinstance(qkv_tokens, torch.Tensor) or qkv_tokens.dim() != 4:
        raise ValueError("qkv_tokens must be a (B, H, W, 3*C) tensor: the qkv Linear of the token map")
    if qkv_tokens.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"qkv_tokens must be one of {names}, got {qkv_tokens.dtype}")
    wh, ww = pair(window_size, "window_size")
    sh, sw = pair(shift_size, "shift_size")
    c3 = qkv_tokens.shape[-1]
    if num_heads < 1 or c3 % (3 * num_heads):
        raise ValueError(f"the last dim {c3} must be 3 * num_heads * head_dim (num_heads={num_heads})")
    limit = unsupported(c3 // (3 * num_heads))
    if limit:
        raise ValueError(limit)
    if wh < 1 or ww < 1 or not (0 <= sh < wh and 0 <= sw < ww):
        raise ValueError(f"need window >= 1 and 0 <= shift < window, got window {(wh, ww)}, "
                         f"shift {(sh, sw)}")
    t_rows = (2 * wh - 1) * (2 * ww - 1)
    n = wh * ww
    if rel_pos_table.shape not in ((t_rows, num_heads), (num_heads, n, n)):
        raise ValueError(f"rel_pos_table must be timm's bias table ({t_rows}, {num_heads}) for a "
                         f"{wh}x{ww} window, or a dense bias ({num_heads}, {n}, {n}); "
                         f"got {tuple(rel_pos_table.shape)}")
    if qkv_bias is not None and qkv_bias.shape != (c3,):
        raise ValueError(f"qkv_bias must be ({c3},), got {tuple(qkv_bias.shape)}")
    others = [t for t in (rel_pos_table, qkv_bias, mask) if t is not None]
    if any(t.device != qkv_tokens.device for t in others):
        raise ValueError(f"qkv_tokens is on {qkv_tokens.device}: the table, qkv_bias and mask "
                         "must be there too")
    if mask is not None:
        n = wh * ww
        if mask.dim() != 3 or mask.shape[1:] != (n, n):
            raise ValueError(f"mask must be (num_windows, {n}, {n}), got {tuple(mask.shape)}")
    return (wh, ww), (sh, sw)


def grid_dims(h, w, win):
    """(padded H, padded W, windows per image, windows per grid row)."""
    wh, ww = win
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    return hp, wp, (hp // wh) * (wp // ww), wp // ww


def check_mask_count(mask, windows: int) -> None:
    if mask is not None and (mask.shape[0] < 1 or windows % mask.shape[0]):
        raise ValueError(f"mask has {mask.shape[0]} windows, which must divide the {windows} "
                         "windows of the batch (window i uses mask i % num_windows)")


def relative_position_index(wh: int, ww: int, device=None) -> torch.Tensor:
    """(N, N) index into the bias table, as timm's ``get_relative_position_index``."""
    ys, xs = torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device),
                            indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # 2, N
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def dense_position_bias(rel_pos_table: torch.Tensor, window_size,
                        index: torch.Tensor | None = None) -> torch.Tensor:
    """(heads, N, N) float32 relative-position bias of a window, from timm's bias table (a dense
    (heads, N, N) bias, such as SwinV2's continuous one, is returned as float32); ``index``: the
    window's flat ``relative_position_index`` where the caller keeps it."""
    if rel_pos_table.dim() == 3:
        return rel_pos_table.float()
    wh, ww = pair(window_size, "window_size")
    idx = relative_position_index(wh, ww, device=rel_pos_table.device).view(-1) \
        if index is None else index
    n = wh * ww
    return rel_pos_table.float()[idx].view(n, n, -1).permute(2, 0, 1)


def region_class_masks(window_size, shift_size, device=None) -> torch.Tensor:
    """(4, N, N) additive masks of timm's shifted-window regions, one per window class
    ``2 * (last window row) + (last window column)``: only those windows mix regions, and all
    windows of a class share one mask (zeros along an axis that is not shifted)."""
    (wh, ww), (sh, sw) = pair(window_size, "window_size"), pair(shift_size, "shift_size")
    ty = torch.arange(wh, device=device).repeat_interleave(ww)
    tx = torch.arange(ww, device=device).repeat(wh)
    out = []
    for last_h in (0, 1):
        for last_w in (0, 1):
            ry = torch.where(ty < wh - sh, 1, 2) if last_h and sh else torch.zeros_like(ty)
            rx = torch.where(tx < ww - sw, 1, 2) if last_w and sw else torch.zeros_like(tx)
            reg = ry * 3 + rx
            out.append(torch.where(reg[:, None] != reg[None, :], MASK_NEG, 0.0))
    return torch.stack(out).float()


def folded_bias_tile(dense_bias: torch.Tensor, masks: torch.Tensor | None, block: int) -> torch.Tensor:
    """The kernels' bias operand: (classes, heads, NB, NB, block, block) float32, contiguous,
    piece [c, h, i, j] = rows i*block.., columns j*block.. of the (heads, N, N) bias plus mask
    class c (masks (classes, N, N), or None for one class), padded to NB*block tokens: 0 in
    padding rows (never stored), -inf in padding columns (no probability)."""
    heads, n, _ = dense_bias.shape
    nb = -(-n // block)
    full = dense_bias.float().unsqueeze(0)
    if masks is not None:
        full = full + masks.float().unsqueeze(1)
    tile = full.new_zeros(full.shape[0], heads, nb * block, nb * block)
    tile[..., n:] = float("-inf")
    tile[..., :n, :n] = full
    return tile.view(-1, heads, nb, block, nb, block).transpose(3, 4).contiguous()


def unfold_bias_grad(dtile: torch.Tensor, n: int) -> torch.Tensor:
    """(heads, N, N) from a (heads, NB, NB, block, block) gradient of the folded tile."""
    heads, nb, _, block, _ = dtile.shape
    return dtile.transpose(2, 3).reshape(heads, nb * block, nb * block)[:, :n, :n]


def shifted_window_mask(hp: int, wp: int, window_size, shift_size, device=None,
                        dtype=torch.float32) -> torch.Tensor:
    """(num_windows, N, N) additive mask of timm's ``get_attn_mask`` for a padded hp x wp grid."""
    (wh, ww), (sh, sw) = pair(window_size, "window_size"), pair(shift_size, "shift_size")
    img = torch.zeros(1, hp, wp, 1, device=device, dtype=dtype)
    cnt = 0
    for hs in ((0, -wh), (-wh, -sh), (-sh, None)):
        for ws in ((0, -ww), (-ww, -sw), (-sw, None)):
            img[:, hs[0]:hs[1], ws[0]:ws[1], :] = cnt
            cnt += 1
    win = _partition(img, wh, ww).reshape(-1, wh * ww)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, MASK_NEG).masked_fill(diff == 0, 0.0)


def _partition(x, wh, ww):
    b, h, w, c = x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh, ww, c)


def _reverse(windows, wh, ww, h, w):
    c = windows.shape[-1]
    x = windows.view(-1, h // wh, w // ww, wh, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def window_attention_reference(qkv_tokens: torch.Tensor, rel_pos_table: torch.Tensor,
                               num_heads: int, window_size, shift_size=0, *,
                               qkv_bias: torch.Tensor | None = None,
                               mask: torch.Tensor | None = None,
                               scale: float | None = None) -> torch.Tensor:
    """Plain-torch window_attention: timm's roll / pad / partition / attention / reverse path.
    Also takes float64, to serve as the high-precision reference of the kernel."""
    (wh, ww), (sh, sw) = check_inputs(qkv_tokens, rel_pos_table, num_heads, window_size,
                                       shift_size, qkv_bias, mask, (*FLOAT_DTYPES, torch.float64))
    bsz, h, w, c3 = qkv_tokens.shape
    c = c3 // 3
    hd = c // num_heads
    scale = hd ** -0.5 if scale is None else scale
    x = qkv_tokens
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    hp, wp, n_win, _ = grid_dims(h, w, (wh, ww))
    check_mask_count(mask, bsz * n_win)
    x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
    if qkv_bias is not None and (hp > h or wp > w):
        pad = torch.ones(hp, wp, dtype=torch.bool, device=x.device)
        pad[:h, :w] = False
        x = torch.where(pad[None, :, :, None], qkv_bias.to(x.dtype), x)
    n = wh * ww
    windows = _partition(x, wh, ww).reshape(-1, n, c3)
    qkv = windows.reshape(-1, n, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = (q * scale) @ k.transpose(-2, -1)
    idx = relative_position_index(wh, ww, device=x.device)
    bias = (rel_pos_table if rel_pos_table.dim() == 3
            else rel_pos_table[idx.view(-1)].view(n, n, -1).permute(2, 0, 1))
    attn = attn + bias.unsqueeze(0)
    if mask is None and (sh or sw):
        mask = shifted_window_mask(hp, wp, (wh, ww), (sh, sw), device=x.device, dtype=attn.dtype)
    if mask is not None:
        nm = mask.shape[0]
        attn = attn.view(-1, nm, num_heads, n, n) + mask.to(attn.dtype).unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, n, n)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, c)
    out = _reverse(out.view(-1, wh, ww, c), wh, ww, hp, wp)[:, :h, :w, :]
    if sh or sw:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out.contiguous()
