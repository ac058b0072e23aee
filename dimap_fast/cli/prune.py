"""``dimap-fast prune``: one model pruned to a ratio or a FLOPs budget, written with its masks (or shrunk)."""

from __future__ import annotations

import argparse
import json

from ..choice import METHODS
from ..errors import DimapError
from .args import EXAMPLES, format_sparsity, pattern_args, ratio, reduction


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("prune", help="prune one model and write it as .safetensors with its masks",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="timm model name (random init) or checkpoint (.safetensors, .pth, .pt)")
    cut = p.add_mutually_exclusive_group(required=True)
    cut.add_argument("--ratio", type=ratio, help="fraction of each module's weights to remove, in [0, 1)")
    cut.add_argument("--flops-reduction", type=reduction, metavar="R",
                     help="fraction of the dense FLOPs to remove, in [0, 1): prunes at the smallest ratio that does "
                          "(channel: the FLOPs of the shrunk model); needs the architecture")
    p.add_argument("--method", choices=METHODS, default="dimap", help="dimap (default), global or uniform")
    p.add_argument("--out", required=True, help="output .safetensors (pruned weights and masks)")
    pattern_args(p)
    p.add_argument("--model", help="timm architecture of a checkpoint (recorded in the output)")
    p.add_argument("--shrink", action="store_true", help="with --pattern channel: write the physically smaller model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (never the input)")
    p.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights for a model name")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..budget import check_budget_pattern, flops_metadata
    from ..checkpoint import check_output, save_pruned
    from ..errors import check_model_name
    from ..loading import check_architecture, load_source, model_config
    from ..plan import plan

    out = check_output(args.out, [args.source])
    if out.exists() and not args.overwrite:
        raise DimapError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
    by_flops = args.flops_reduction is not None
    if by_flops:
        check_budget_pattern(args.pattern)  # before loading anything
    if args.shrink:
        return _prune_and_shrink(args, out)
    if args.model:
        check_model_name(args.model)  # before reading a large checkpoint
    src = load_source(args.source, arch=args.model, pretrained=args.pretrained, need_model=by_flops)
    if by_flops and src.model is None:
        raise DimapError(f"--flops-reduction counts FLOPs by running the architecture, and {args.source} names none: "
                         "pass --model NAME")
    if src.path is not None and src.arch and src.model is None:  # a checkpoint of another architecture is refused
        check_architecture({k: tuple(v.shape) for k, v in src.state_dict.items()}, src.arch, src.path)
    # the model holds the checkpoint's values, so both plans give the same masks; only a model can be run
    p = plan(src.model if by_flops else src.state_dict, method=args.method, progress=True, pattern=args.pattern)
    chosen = p.ratio_for_flops(args.flops_reduction) if by_flops else args.ratio
    masks = p.masks(chosen)
    state = src.state_dict  # save_pruned prunes each weight as it writes it: no pruned copy
    meta = {"method": args.method, "ratio": repr(chosen), "source": args.source, "timm_model": src.arch or "",
            **args.pattern.metadata()}
    if by_flops:
        meta.update(flops_metadata(p, args.flops_reduction, chosen))
    if model_config(src.metadata):
        meta["model_config"] = json.dumps(model_config(src.metadata))
    save_pruned(out, state, masks, meta)
    print(format_sparsity(p.sparsity(chosen)))
    if by_flops:
        print(format_budget(p, args.flops_reduction, chosen, shrunk=args.shrink))
    print(f"wrote {out}")
    return 0


def format_budget(p, target: float, chosen: float, shrunk: bool) -> str:
    """The ratio a FLOPs reduction chose and what it removes."""
    where = " once shrunk (--shrink)" if p.pattern.kind == "channel" and not shrunk else ""
    return f"ratio {chosen!r} removes {p.flops_reduction(chosen):.2%} of the FLOPs{where} (asked for {target:.2%})"


def _prune_and_shrink(args, out) -> int:
    from ..checkpoint import save_shrunk
    from ..loading import load_source, model_config
    from ..plan import plan
    from ..shrink import block_sizes, shrink

    if args.pattern.kind != "channel":
        raise DimapError("--shrink removes whole neurons and heads: use it with --pattern channel")
    src = load_source(args.source, arch=args.model, need_model=True, pretrained=args.pretrained)
    if src.model is None:
        raise DimapError(f"{args.source} names no architecture: pass --model NAME to shrink it")
    p = plan(src.model, method=args.method, progress=True, pattern=args.pattern)
    by_flops = args.flops_reduction is not None
    chosen = p.ratio_for_flops(args.flops_reduction) if by_flops else args.ratio
    p.prune_(chosen)
    model = shrink(src.model)
    config = model_config(src.metadata)
    save_shrunk(model, out, arch=src.arch if config is None else None, config=config)
    print(format_sparsity(p.sparsity(chosen)))
    if by_flops:
        print(format_budget(p, args.flops_reduction, chosen, shrunk=True))
    sizes = block_sizes(model)
    print(f"{len(sizes)} blocks; heads {[v['heads'] for v in sizes.values()]}")
    print(f"wrote {out} ({sum(t.numel() for t in model.parameters()):,} parameters)")
    return 0
