"""The ``dimap-fast`` command: prune, report, sweep, demo.

Every refusal is one line on stderr and exit code 2, with nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import METHODS, DimapError, check_ratio

EXAMPLES = """\
examples:
  dimap-fast demo                                     prune a small Swin trained on digits
  dimap-fast prune swin_tiny_patch4_window7_224 --ratio 0.5 --out tiny50.safetensors
  dimap-fast prune ckpt.pth --model swin_base_patch4_window7_224 --ratio 0.35 --out b35.safetensors
  dimap-fast prune swin_tiny_patch4_window7_224 --flops-reduction 0.5 --out tiny_half_flops.safetensors
  dimap-fast report tiny50.safetensors --model swin_tiny_patch4_window7_224
  dimap-fast report tiny50.safetensors --json
  dimap-fast sweep swin_tiny_patch4_window7_224 swin_small_patch4_window7_224 \\
      --ratios 0.15,0.35,0.55 --methods dimap,uniform --out-dir sweeps/
  dimap-fast sweep swin_tiny_patch4_window7_224 --flops-reductions 0.3,0.5 --out-dir sweeps/
  dimap-fast finetune --data digits --ratio 0.7 --out runs/d70
  dimap-fast eval runs/d70/model.safetensors
"""


def _ratio(text: str) -> float:
    try:
        return check_ratio(float(text))
    except (ValueError, DimapError) as exc:
        raise argparse.ArgumentTypeError(str(exc) if isinstance(exc, DimapError) else f"ratio must be a number in [0, 1), got {text!r}")


def _ratios(text: str) -> list[float]:
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("give ratios as a comma-separated list, e.g. 0.15,0.35,0.55")
    return [_ratio(p.strip()) for p in parts]


def _reduction(text: str) -> float:
    from .budget import check_reduction

    try:
        return check_reduction(float(text))
    except ValueError as exc:  # DimapError is one too
        raise argparse.ArgumentTypeError(str(exc) if isinstance(exc, DimapError) else f"a FLOPs reduction must be a number in [0, 1), got {text!r}")


def _reductions(text: str) -> list[float]:
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("give FLOPs reductions as a comma-separated list, e.g. 0.3,0.5")
    return [_reduction(p.strip()) for p in parts]


def _methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise argparse.ArgumentTypeError(f"unknown method {m!r}: choose from {', '.join(METHODS)}")
    return methods


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, where to look), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _pattern_args(p) -> None:
    from .patterns import BLOCK_SIZES, PATTERNS

    p.add_argument("--pattern", choices=PATTERNS, default="unstructured",
                   help="unstructured (the paper, default), block tiles, channel (neurons and heads) or 2:4")
    p.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=32, help="tile size for --pattern block")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dimap-fast",
        description="DIMAP pruning (He & Zhou, ICLR 2024) for timm's Swin family.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)

    p = sub.add_parser("prune", help="prune one model and write it as .safetensors with its masks",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="timm model name (random init) or checkpoint (.safetensors, .pth, .pt)")
    cut = p.add_mutually_exclusive_group(required=True)
    cut.add_argument("--ratio", type=_ratio, help="fraction of each module's weights to remove, in [0, 1)")
    cut.add_argument("--flops-reduction", type=_reduction, metavar="R",
                     help="fraction of the dense FLOPs to remove, in [0, 1): prunes at the smallest ratio that does "
                          "(channel: the FLOPs of the shrunk model); needs the architecture")
    p.add_argument("--method", choices=METHODS, default="dimap", help="dimap (default), global or uniform")
    p.add_argument("--out", required=True, help="output .safetensors (pruned weights and masks)")
    _pattern_args(p)
    p.add_argument("--model", help="timm architecture of a checkpoint (recorded in the output)")
    p.add_argument("--shrink", action="store_true", help="with --pattern channel: write the physically smaller model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (never the input)")
    p.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights for a model name")

    r = sub.add_parser("report", help="sparsity per module and layer, parameters and FLOPs")
    r.add_argument("source", help="timm model name or checkpoint")
    r.add_argument("--model", help="timm architecture of a checkpoint (needed for FLOPs)")
    r.add_argument("--input-size", type=int, default=None, help="image size for FLOPs (default: the model's)")
    r.add_argument("--layers", action="store_true", help="also list every prunable layer")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    r.add_argument("--throughput", action="store_true", help="also time images/s, dense architecture vs this model")
    r.add_argument("--batch", type=int, default=8, help="batch size for --throughput (default 8)")

    s = sub.add_parser("sweep", help="prune several models at several ratios, one output per pair")
    s.add_argument("sources", nargs="+", help="timm model names or checkpoints")
    cut = s.add_mutually_exclusive_group(required=True)
    cut.add_argument("--ratios", type=_ratios, help="comma-separated, e.g. 0.15,0.35,0.55")
    cut.add_argument("--flops-reductions", type=_reductions, metavar="R1,R2",
                     help="comma-separated fractions of the dense FLOPs to remove, e.g. 0.3,0.5: one output per "
                          "reduction, at the smallest ratio that reaches it")
    s.add_argument("--methods", type=_methods, default=["dimap"], help="comma-separated (default dimap)")
    s.add_argument("--out-dir", required=True, help="folder for the outputs and summary.csv")
    _pattern_args(s)
    s.add_argument("--model", help="timm architecture of the checkpoints")
    s.add_argument("--masks-only", action="store_true", help="write only the masks, not the pruned weights")

    from .kernel_bench import add_bench_parser

    add_bench_parser(sub)

    from .finetune import add_parsers

    add_parsers(sub)  # finetune, eval

    d = sub.add_parser("demo", help="prune a small Swin trained on scikit-learn's digits, before/after accuracy")
    d.add_argument("--out-dir", default="demo_out", help="where the pruned checkpoint goes (default demo_out/)")
    d.add_argument("--ratios", type=_ratios, default=[0.5, 0.8], help="default 0.5,0.8")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors and --help: return the code so main() stays callable
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    previous = _on_sigterm(_terminate)
    try:
        func = getattr(args, "func", None) or COMMANDS[args.command]
        return func(args)
    except DimapError as exc:
        print(f"dimap-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("dimap-fast: interrupted; finished outputs are complete, nothing partial was left", file=sys.stderr)
        return 143 if exc.args == ("SIGTERM",) else 130
    finally:
        if previous is not None:
            _on_sigterm(previous)


def _terminate(signum, frame):
    raise KeyboardInterrupt("SIGTERM")  # stop as on Ctrl-C: the output being written removes its temporary file


def _on_sigterm(handler):
    """Install a SIGTERM handler (main thread only, where signals arrive); returns the previous one."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def cmd_prune(args) -> int:
    from .budget import check_budget_pattern, flops_metadata
    from .errors import check_model_name
    from .io import check_architecture, check_output, save_pruned
    from .masks import prune_state
    from .plan import plan
    from .sources import load_source

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
    p = plan(src.model if by_flops else src.state_dict, method=args.method, progress=True, pattern=args.pattern,
             block_size=args.block_size)
    ratio = p.ratio_for_flops(args.flops_reduction) if by_flops else args.ratio
    masks = p.masks(ratio)
    state = prune_state(src.state_dict, masks)
    meta = {"method": args.method, "ratio": repr(ratio), "source": args.source, "timm_model": src.arch or "",
            "pattern": args.pattern, "block_size": str(args.block_size)}
    if by_flops:
        meta.update(flops_metadata(p, args.flops_reduction, ratio))
    for key in ("model_config",):
        if key in src.metadata:
            meta[key] = src.metadata[key]
    save_pruned(out, state, masks, meta)
    print(format_sparsity(p.sparsity(ratio)))
    if by_flops:
        print(format_budget(p, args.flops_reduction, ratio, shrunk=args.shrink))
    print(f"wrote {out}")
    return 0


def format_budget(p, target: float, ratio: float, shrunk: bool) -> str:
    """The ratio a FLOPs reduction chose and what it removes."""
    where = " once shrunk (--shrink)" if p.pattern == "channel" and not shrunk else ""
    return f"ratio {ratio!r} removes {p.flops_reduction(ratio):.2%} of the FLOPs{where} (asked for {target:.2%})"


def _prune_and_shrink(args, out) -> int:
    import json

    from .plan import plan
    from .shrink import block_sizes, save_shrunk, shrink
    from .sources import load_source

    if args.pattern != "channel":
        raise DimapError("--shrink removes whole neurons and heads: use it with --pattern channel")
    src = load_source(args.source, arch=args.model, need_model=True, pretrained=args.pretrained)
    if src.model is None:
        raise DimapError(f"{args.source} names no architecture: pass --model NAME to shrink it")
    p = plan(src.model, method=args.method, progress=True, pattern="channel")
    by_flops = args.flops_reduction is not None
    ratio = p.ratio_for_flops(args.flops_reduction) if by_flops else args.ratio
    p.prune_(ratio)
    model = shrink(src.model)
    config = json.loads(src.metadata["model_config"]) if "model_config" in src.metadata else None
    save_shrunk(model, out, arch=src.arch if config is None else None, config=config)
    print(format_sparsity(p.sparsity(ratio)))
    if by_flops:
        print(format_budget(p, args.flops_reduction, ratio, shrunk=True))
    sizes = block_sizes(model)
    print(f"{len(sizes)} blocks; heads {[v['heads'] for v in sizes.values()]}")
    print(f"wrote {out} ({sum(t.numel() for t in model.parameters()):,} parameters)")
    return 0


def format_sparsity(sp: dict) -> str:
    lines = [f"{'module':<10}{'removed':>10}"]
    lines += [f"{m:<10}{v:>10.2%}" for m, v in sp["modules"].items()]
    return "\n".join(lines)


def cmd_report(args) -> int:
    from .flops import format_report, report, report_json
    from .sources import load_source

    src = load_source(args.source, arch=args.model, need_model=True)
    rep = report(src.model if src.model is not None else src.state_dict, input_size=args.input_size)
    if src.metadata.get("format") == "dimap-fast/shrunk-1":
        from .sources import create_timm_model, demo_model_from_metadata

        base = create_timm_model(src.arch) if src.arch else demo_model_from_metadata(src.metadata)
        rep["base"] = {k: report(base, input_size=args.input_size)[k]["dense"] for k in ("params", "flops")}
    if args.throughput:
        if src.model is None:
            raise DimapError("--throughput needs an architecture: pass --model NAME")
        from .speed import compare_throughput

        rep["throughput"] = compare_throughput(src, batch=args.batch, input_size=args.input_size)
    if args.json:
        print(report_json(rep))
    else:
        print(format_report(rep, layers=args.layers))
        if rep["flops"] is None:
            print("FLOPs   unknown: pass --model NAME to count them")
        if "base" in rep:
            b = rep["base"]
            print(f"shrunk from params {b['params']:,}, FLOPs {b['flops']:,}: "
                  f"{rep['params']['dense'] / b['params']:.1%} of the params, {rep['flops']['dense'] / b['flops']:.1%} of the FLOPs")
        if "throughput" in rep:
            t = rep["throughput"]
            print(f"images/s  dense {t['dense']:.1f}   this model {t['model']:.1f}   speed-up {t['speedup']:.2f}x "
                  f"(batch {t['batch']}, {t['device']})")
    return 0


def cmd_sweep(args) -> int:
    from .sweep import sweep

    sweep(args.sources, args.ratios, args.methods, Path(args.out_dir), arch=args.model, masks_only=args.masks_only,
          pattern=args.pattern, block_size=args.block_size, flops_reductions=args.flops_reductions)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out_dir), args.ratios)
    return 0


def cmd_bench(args) -> int:
    from .kernel_bench import run_kernel_bench

    return run_kernel_bench(args)


COMMANDS = {"prune": cmd_prune, "report": cmd_report, "sweep": cmd_sweep, "demo": cmd_demo, "bench": cmd_bench}

if __name__ == "__main__":
    sys.exit(main())
