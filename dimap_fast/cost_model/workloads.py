"""The named workloads the static report estimates: Swin-T/B stage shapes at batch 128 (window 7 at
224, window 12 at 384; window 12 training also at the GPU check's batch 32), the block-sparse linear of Swin-B's MLPs at 50/75/90% of its 64 x 64
tiles pruned (the GPU check's speed.linear shapes).

Each workload calls the real launcher on real CPU tensors (inside ``capture.gpu_launches``, which
records instead of running) and knows its memory floor: each input read once, each output written
once. Tensors are allocated with torch.empty: pages the replayed programs never touch cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# name -> (embed dim, heads of the first stage)
SWIN = {"swin_t": (96, 3), "swin_b": (128, 4)}
TIMM_NAMES = {"swin_t": "swin_tiny_patch4_window7_224", "swin_b": "swin_base_patch4_window7_224"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BATCH = 128


@dataclass(frozen=True)
class Attention:
    model: str = "swin_b"
    stage: int = 0
    dtype: str = "fp16"
    image: int = 224
    window: int = 7
    backward: bool = False
    batch: int = BATCH
    bias_grad: str = "flush"  # the backward's way to the bias gradient (window_attention_settings)
    kv_prefetch: str = "off"  # whether the forward keeps the next key blocks in flight (the same)

    @property
    def name(self) -> str:
        tail = "" if self.window == 7 else f".w{self.window}_{self.image}"
        tail += "" if self.batch == BATCH else f".b{self.batch}"
        tail += "" if self.bias_grad == "flush" else f".bias_{self.bias_grad}"
        tail += "" if self.kv_prefetch == "off" else ".kv_prefetch"
        return (f"attention.{'fwd_bwd' if self.backward else 'fwd'}.{self.model}.s{self.stage + 1}"
                f"{tail}.{self.dtype}")

    def shape(self) -> tuple[int, int, int, int]:
        dim, heads = SWIN[self.model]
        side = self.image // 4 // 2 ** self.stage
        return side, dim * 2 ** self.stage, heads * 2 ** self.stage, self.window

    def floor_bytes(self) -> float:
        side, c, _, _ = self.shape()
        tokens = self.batch * side * side
        es = DTYPES[self.dtype].itemsize
        fwd = tokens * 4 * c * es  # qkv in, output out
        return fwd + (tokens * 6 * c * es if self.backward else 0)  # dO and qkv in, dqkv out

    def run(self, steady=lambda: None) -> None:
        """Two calls, ``steady()`` between them: the second is what every later call costs. In
        inference the bias tile folded by the first is reused; in training the table changed
        (an optimizer step) and the tile is folded again."""
        from ..kernels import window_attention
        from ..kernels.window_attention_settings import bias_grad, kv_prefetch

        side, c, heads, win = self.shape()
        dt = DTYPES[self.dtype]
        grad = self.backward
        qkv = torch.empty(self.batch, side, side, 3 * c, dtype=dt).requires_grad_(grad)
        table = torch.zeros((2 * win - 1) ** 2, heads, dtype=dt, requires_grad=grad)
        qkv_bias = torch.zeros(3 * c, dtype=dt, requires_grad=grad)
        d_out = torch.empty(self.batch, side, side, c, dtype=dt) if grad else None  # the next layer's
        for step in range(2):
            if step and grad:
                with torch.no_grad():
                    table.add_(1.0)
            if step:
                steady()
            with kv_prefetch(self.kv_prefetch):
                out = window_attention(qkv, table, heads, win, win // 2, qkv_bias=qkv_bias)
            if grad:  # the gradients themselves, as the layers around would take them
                with bias_grad(self.bias_grad):
                    torch.autograd.grad(out, (qkv, table, qkv_bias), d_out)


@dataclass(frozen=True)
class SparseLinear:
    model: str = "swin_b"
    stage: int = 2
    pruned: float = 0.75
    batch: int = BATCH
    dtype: str = "fp16"
    block: int = 64

    @property
    def name(self) -> str:  # as the GPU check's speed.linear rows: b = tile side, t = tiles pruned
        return (f"sparse_linear.{self.model}.s{self.stage + 1}_mlp.b{self.block}."
                f"t{round(self.pruned * 100)}.{self.dtype}")

    def shapes(self) -> list[tuple[int, int, int]]:
        """(rows, in, out) of the stage's two MLP Linears."""
        dim, _ = SWIN[self.model]
        c = dim * 2 ** self.stage
        side = 224 // 4 // 2 ** self.stage
        m = self.batch * side * side
        return [(m, c, 4 * c), (m, 4 * c, c)]

    def floor_bytes(self, kept: float | None = None) -> float:
        es = DTYPES[self.dtype].itemsize
        kept = 1 - self.pruned if kept is None else kept
        return sum((m * k + m * n + kept * k * n) * es for m, k, n in self.shapes())

    def dense_flops(self) -> float:
        return sum(2 * m * k * n for m, k, n in self.shapes())

    def run(self, steady=lambda: None) -> None:
        from ..kernels import block_sparse_linear, pack_block_sparse

        dt = DTYPES[self.dtype]
        gen = torch.Generator().manual_seed(0)
        for m, k, n in self.shapes():
            b = self.block
            keep = torch.rand(n // b, k // b, generator=gen) >= self.pruned
            w = torch.randn(n, k, generator=gen).to(dt)
            w = w * keep.repeat_interleave(b, 0).repeat_interleave(b, 1).to(dt)
            packed = pack_block_sparse(w, b)
            x = torch.empty(m, k, dtype=dt)
            block_sparse_linear(x, packed, torch.zeros(n, dtype=dt))


def attention_workloads() -> list[Attention]:
    out = [Attention(model, 0, dt) for model in SWIN for dt in DTYPES]
    # window 12 also with the next key blocks in flight (the GPU check times both ways)
    out += [Attention("swin_b", 0, "fp16", image=384, window=12, kv_prefetch=p) for p in ("off", "on")]
    out += [Attention(model, 0, "fp16", backward=True) for model in SWIN]
    # the GPU check's window-12 training rows (its batch), the bias gradient both ways: the dQ
    # backward's per-window atomics, which this model shows but does not price, or their own
    # kernel; a first GPU run prices the atomics
    out += [Attention("swin_b", 0, "fp16", image=384, window=12, backward=True, batch=32,
                      bias_grad=g) for g in ("flush", "sum")]
    return out


def sparse_workloads() -> list[SparseLinear]:
    out = [SparseLinear("swin_b", 2, p) for p in (0.5, 0.75, 0.9)]
    out += [SparseLinear("swin_b", 0, p) for p in (0.5, 0.75, 0.9)]
    return out
