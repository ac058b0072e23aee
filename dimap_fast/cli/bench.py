"""``dimap-fast bench``: time the block-sparse linear (and the fused window attention on CUDA);
``--static``: the static cost model's estimates for an H100 instead.

The flags are parsed here; the timing is ``bench_body``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..engine.values import TILE_SIZES
from ..errors import DimapError
from .args import positive


def shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            a, b = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {part!r} must be INxOUT, e.g. 384x1536") from None
        if a < 1 or b < 1:
            raise argparse.ArgumentTypeError(f"shape {part!r} must have positive sizes")
        out.append((a, b))
    if not out:
        raise argparse.ArgumentTypeError("give shapes as INxOUT,..., e.g. 384x1536,768x3072")
    return out


def sparsities(text: str) -> list[float]:
    try:
        vals = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsities must be numbers, got {text!r}") from None
    if not vals or not all(0.0 <= v <= 1.0 for v in vals):
        raise argparse.ArgumentTypeError("sparsities must be fractions in [0, 1], e.g. 0.25,0.5,0.75")
    return vals


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .bench_body import CPU_TOKENS, CUDA_TOKENS

    p = subparsers.add_parser(
        "bench", help="time the block-sparse linear (and fused window attention on CUDA)",
        description="Dense vs block-sparse linear over shapes and tile sparsities; on CUDA also "
                    "the fused window attention vs timm's roll/partition path.")
    p.add_argument("--shapes", type=shapes, default=shapes("384x1536,768x3072"),
                   help="Linear sizes INxOUT, comma-separated (default 384x1536,768x3072)")
    p.add_argument("--sparsities", type=sparsities, default=[0.25, 0.5, 0.75],
                   help="fractions of BxB tiles zeroed (default 0.25,0.5,0.75)")
    p.add_argument("--block", type=int, choices=TILE_SIZES, default=32, help="tile side (default 32)")
    p.add_argument("--batch-tokens", type=positive, default=None,
                   help=f"rows of x (default {CPU_TOKENS} on CPU, {CUDA_TOKENS} on CUDA); the "
                        "window-attention rows use batch-tokens // 196 images")
    p.add_argument("--plot", type=Path, default=None, metavar="PATH.png",
                   help="also draw speed-up vs sparsity to this PNG (needs matplotlib)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when present, else CPU")
    p.add_argument("--static", action="store_true",
                   help="instead: print the static cost model's estimates for an H100 (the project's "
                        "kernels compiled for sm_90 here, no GPU needed) and their targets")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="with --static: also write the rows (name, value, unit, target, met) as JSON")
    p.add_argument("--save-choices", action="store_true",
                   help="instead: time convert's candidates (dense, block-sparse kernel, torch BSR, 2:4) "
                        "for these shapes, sparsities and block on this device and save them where "
                        "convert looks (~/.cache/dimap_fast/linear_choices.json)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from .bench_body import run_kernel_bench, save_choices

    if args.json is not None and not args.static:
        raise DimapError("--json goes with --static")
    if args.static:
        return run_static(args.json)
    return save_choices(args) if args.save_choices else run_kernel_bench(args)


def run_static(json_path: Path | None) -> int:
    from ..cost_model.report import CACHE, build, cached_rows, format_table, source_key, write_json

    if json_path is not None and json_path.is_dir():
        raise DimapError(f"--json {json_path} is a directory: name a file")
    key = source_key()
    reused = cached_rows(key) is not None
    rows = build()
    print(format_table(rows))
    if reused:
        print(f"(built before from these same sources; kept in {CACHE})")
    if json_path is not None:
        write_json(json_path, rows, key)
        print(f"rows written to {json_path}")
    return 0
