"""``dimap-fast sweep``: several models at several ratios or FLOPs budgets, one output per pair (``..sweep``)."""

from __future__ import annotations

from pathlib import Path

from .args import methods, pattern_args, ratios, reductions


def add_parser(subparsers) -> None:
    s = subparsers.add_parser("sweep", help="prune several models at several ratios, one output per pair")
    s.add_argument("sources", nargs="+", help="timm model names or checkpoints")
    cut = s.add_mutually_exclusive_group(required=True)
    cut.add_argument("--ratios", type=ratios, help="comma-separated, e.g. 0.15,0.35,0.55")
    cut.add_argument("--flops-reductions", type=reductions, metavar="R1,R2",
                     help="comma-separated fractions of the dense FLOPs to remove, e.g. 0.3,0.5: one output per "
                          "reduction, at the smallest ratio that reaches it")
    s.add_argument("--methods", type=methods, default=["dimap"], help="comma-separated (default dimap)")
    s.add_argument("--out-dir", required=True, help="folder for the outputs and summary.csv")
    pattern_args(s)
    s.add_argument("--model", help="timm architecture of the checkpoints")
    s.add_argument("--masks-only", action="store_true", help="write only the masks, not the pruned weights")
    s.set_defaults(run=run)


def run(args) -> int:
    from .sweep_body import sweep

    sweep(args.sources, args.ratios, args.methods, Path(args.out_dir), arch=args.model, masks_only=args.masks_only,
          pattern=args.pattern, flops_reductions=args.flops_reductions)
    return 0
