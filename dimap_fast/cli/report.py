"""``dimap-fast report``: sparsity per module and layer, parameters and FLOPs, optionally images/s."""

from __future__ import annotations

from ..errors import DimapError
from .args import positive


def add_parser(subparsers) -> None:
    r = subparsers.add_parser("report", help="sparsity per module and layer, parameters and FLOPs")
    r.add_argument("source", help="timm model name or checkpoint")
    r.add_argument("--model", help="timm architecture of a checkpoint (needed for FLOPs)")
    r.add_argument("--input-size", type=positive, default=None, help="image size for FLOPs (default: the model's)")
    r.add_argument("--layers", action="store_true", help="also list every prunable layer")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    r.add_argument("--throughput", action="store_true", help="also time images/s, dense architecture vs this model")
    r.add_argument("--batch", type=positive, default=8, help="batch size for --throughput (default 8)")
    r.set_defaults(run=run)


def run(args) -> int:
    from ..io.checkpoint import is_shrunk
    from ..engine.flops import format_report, report, report_json
    from ..io.models import create_timm_model, demo_model_from_metadata, load_source

    src = load_source(args.source, arch=args.model, need_model=True)
    rep = report(src.model if src.model is not None else src.state_dict, input_size=args.input_size)
    if is_shrunk(src.metadata):
        base = create_timm_model(src.arch) if src.arch else demo_model_from_metadata(src.metadata)
        rep["base"] = {k: report(base, input_size=args.input_size)[k]["dense"] for k in ("params", "flops")}
    if args.throughput:
        if src.model is None:
            raise DimapError("--throughput needs an architecture: pass --model NAME")
        from .throughput import compare_throughput

        rep["throughput"] = compare_throughput(src, batch=args.batch, input_size=args.input_size)
    if args.json:
        print(report_json(rep))
        return 0
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
              f"(batch {t['batch']}, {t['device']}, both on timm's {t['attention']} attention)")
        if "speedup_converted" in t:
            print(f"converted (dimap_fast.nn): dense {t['dense_converted']:.1f}   this model "
                  f"{t['model_converted']:.1f}   speed-up {t['speedup_converted']:.2f}x")
    return 0
