"""``dimap-fast demo``: prune the shipped digits Swin and show its accuracy before and after (``..demo``)."""

from __future__ import annotations

from pathlib import Path

from .args import ratios


def add_parser(subparsers) -> None:
    d = subparsers.add_parser("demo", help="prune a small Swin trained on scikit-learn's digits, before/after accuracy")
    d.add_argument("--out-dir", default="demo_out", help="where the pruned checkpoint goes (default demo_out/)")
    d.add_argument("--ratios", type=ratios, default=[0.5, 0.8], help="default 0.5,0.8")
    d.set_defaults(run=run)


def run(args) -> int:
    from .demo_body import run_demo

    run_demo(Path(args.out_dir), args.ratios)
    return 0
