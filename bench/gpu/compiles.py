"""How many Triton compiles each gpu_check step needs on a cold machine, counted with nothing run.

A cold machine (empty Triton and inductor caches) compiles every kernel variant a step launches:
one per distinct specialization (signature, constexprs, alignment attributes, warps, stages),
and an autotuned launch one per config. ``count()`` calls the launchers with each step's real
shapes and dtypes on empty CPU tensors under TRITON_INTERPRET=1, inside
``dimap_fast.cost_model.capture.gpu_launches`` (the launchers pick their GPU tiles, every launch
is recorded instead of run) and asks triton's own binder (``capture.spec``) what each launch
would compile. The models' launches are their blocks' launcher calls (qkv token map into the
window attention, the four prunable Linears on the block-sparse kernel), not a forward pass.

Counted elsewhere, with nothing to call: ``tests`` (issue 20's count of `pytest -m gpu tests`
under triton 3.6's rules: its shapes are the tests'), the scoring kernels (their variants are
per dtype and block shape, not per tensor shape) and ``finetune`` (the demo model's three
attention kernels, twice: an estimate).

``python -m gpu.compiles (from bench/) [--write]`` prints the counts (and writes COUNTS_FILE, which
the budgets in driver.py read; a dry run recounts and its test checks the file is current).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dimap_fast.atomic import write_text_atomic

COUNTS_FILE = Path(__file__).resolve().parent / "compiles.json"
COMPILE_S = 1.5  # estimate: seconds of one sm_90 compile of these kernels on a lent machine's CPU
TESTS_COMPILES = 224  # issue 20's count for `pytest -m gpu tests`
TESTS_WORKERS = 12  # pytest -n 12 on the 16-core machine: compiles spread over processes
CONVERT_BATCH = 16  # every stage's row count a multiple of 16 at 224: one specialization per Linear kind
FINETUNE_COMPILES = 12  # estimate: forward + two backward attention kernels, per stage shape, twice
STEPS = ("tests", "kernels", "plan", "convert", "finetune", "speed")

# family -> (embed dim, depths, heads); stage resolutions at 224 with window 7
SWIN = {"swin_t": (96, (2, 2, 6, 2), (3, 6, 12, 24)), "swin_b": (128, (2, 2, 18, 2), (4, 8, 16, 32))}
RES_224 = (56, 28, 14, 7)
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def counts() -> dict[str, int]:
    """The committed counts (COUNTS_FILE), which the budgets follow."""
    return json.loads(COUNTS_FILE.read_text())


def planned(step: str) -> int:
    return counts()[step]


def compile_seconds(step: str, parallel: int = 1) -> float:
    """Estimated seconds the step spends compiling, ``parallel`` compiles at a time."""
    return planned(step) * COMPILE_S / parallel


# ---- counting (TRITON_INTERPRET=1, before triton is imported) ----

def _attention(dtype: str, b: int, h: int, w: int, c: int, heads: int, win: int, shift: int, train=False):
    import torch

    from dimap_fast.kernels import window_attention

    dt = getattr(torch, _DTYPES[dtype])
    qkv = torch.empty(b, h, w, 3 * c, dtype=dt, requires_grad=train)
    table = torch.zeros((2 * win - 1) ** 2, heads, dtype=dt, requires_grad=train)
    bias = torch.zeros(3 * c, dtype=dt, requires_grad=train)
    out = window_attention(qkv, table, heads, win, shift, qkv_bias=bias)
    if train:
        out.backward(torch.zeros_like(out))


_PACKED = {}


def _linear(dtype: str, m: int, k: int, n: int, block: int):
    import torch

    from dimap_fast.kernels import block_sparse_linear, pack_block_sparse

    dt = getattr(torch, _DTYPES[dtype])
    key = (dtype, k, n, block)
    if key not in _PACKED:
        w = torch.ones(n, k, dtype=dt)
        w.view(n // block, block, k // block, block)[:, :, ::2] = 0  # half the tiles zeroed
        _PACKED[key] = pack_block_sparse(w, block)
    block_sparse_linear(torch.empty(m, k, dtype=dt), _PACKED[key], torch.zeros(n, dtype=dt))


def _model(family: str, dtype: str, batch: int, block: int | None = 32, train: bool = False):
    embed, depths, heads = SWIN[family]
    for i, (depth, nh, res) in enumerate(zip(depths, heads, RES_224)):
        c = embed << i
        for shift in ((0, 3) if res > 7 and depth > 1 else (0,)):
            _attention(dtype, batch, res, res, c, nh, 7, shift, train)
        if block:
            for k, n in ((c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)):
                _linear(dtype, batch * res * res, k, n, block)


def _precision(name: str):
    import torch

    torch.set_float32_matmul_precision(name)  # the launchers read it at each call


def _kernels_step():
    from . import kernel_checks as gk

    shapes, block, m = gk.linear_shapes(False)
    for variant, (dtype, precision) in gk.VARIANTS.items():
        _precision(precision)
        short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype]
        for cases in gk.attention_groups(False).values():
            for b, h, w, c, heads, win, shift in cases:
                _attention(short, b, h, w, c, heads, win, shift)
        for k, n in shapes:
            _linear(short, m, k, n, block)


def _convert_step():
    for dtype, precision in (("fp32", "highest"), ("fp32", "high"), ("fp16", "highest")):
        _precision(precision)
        _model("swin_t", dtype, CONVERT_BATCH)


def _speed_step():
    from . import speed as gs

    _precision("highest")
    for res, c, heads in gs.ATTN.values():
        _attention("fp16", gs.BATCH, res, res, c, heads, 7, 3)
    for g in ("s1_mlp", "s3_mlp"):
        tokens, shapes = gs.sparse.LINEAR[g]
        for k, n in shapes:
            _linear("fp16", gs.BATCH * tokens, k, n, 64)
    for family in SWIN:
        for dtype in ("fp16", "fp32"):
            _model(family, dtype, gs.BATCH)  # model rows; the e2e block rows launch a subset of fp16's
    _model("swin_b", "fp16", gs.BATCH, block=None)  # model_attn: dense weights
    _attention("fp16", gs.BATCH, 56, 56, 128, 4, 7, 3, train=True)  # attn_train
    _attention("fp16", gs.BATCH, 64, 64, 128, 4, 8, 4)  # v2_attn (swinv2_b stage 1)
    _model("swin_b", "fp16", 64, block=None, train=True)  # train: one step under fp16 autocast


def _scoring_variants(dtypes) -> int:
    # importance: _layer_carries once, _block_totals and _block_scores per weight dtype; apply:
    # _count_block and _apply_block per dtype; select: one _keep_counts block shape per (ratios,
    # layers) bucket a plan meets, two here (kernels.launch_configs() lists every one it could)
    return 1 + 4 * len(dtypes) + 2


def count() -> dict[str, int]:
    """Compiles per step, counted from the launchers' recorded launches (see the module doc)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("set TRITON_INTERPRET=1 before anything imports triton")
    from dimap_fast.cost_model.capture import gpu_launches, spec

    out = {"tests": TESTS_COMPILES, "plan": _scoring_variants(("fp32",)), "finetune": FINETUNE_COMPILES}
    for step, fn in (("kernels", _kernels_step), ("convert", _convert_step), ("speed", _speed_step)):
        with gpu_launches() as launches:
            fn()
        out[step] = len({(launch.name, json.dumps(spec(launch), sort_keys=True, default=str))
                         for launch in launches})
    out["kernels"] += _scoring_variants(("fp32", "fp16"))
    out["speed"] += out["plan"]
    return {s: out[s] for s in STEPS}


def count_compiles():
    """Count this process's compiles from now on (triton's jit_cache_hook runs before each one);
    returns a function giving the count, None under the interpreter (it compiles nothing)."""
    seen = {"n": 0}
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return lambda: None
    try:
        import triton

        previous = triton.knobs.runtime.jit_cache_hook
    except (ImportError, AttributeError):
        return lambda: None

    def hook(*args, **kwargs):
        seen["n"] += 1
        return previous(*args, **kwargs) if previous else False

    triton.knobs.runtime.jit_cache_hook = hook
    return lambda: seen["n"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    found = count()
    print(json.dumps(found))
    if "--write" in argv:
        write_text_atomic(COUNTS_FILE, json.dumps(found, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
