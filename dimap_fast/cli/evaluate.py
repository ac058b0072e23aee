"""``dimap-fast eval``: top-1 (and top-5) accuracy of a model, pruned or not, on a validation set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import DimapError
from .finetune import accuracy_line, model_args, prepare, workers

EXAMPLES = """\
examples:
  dimap-fast eval runs/digits70/model.safetensors          data recorded in the checkpoint
  dimap-fast eval --data digits --ratio 0.8 --method uniform   the shipped model, pruned one-shot
  dimap-fast eval tiny50.safetensors --data /data/imagenet
"""


def add_parser(subparsers) -> None:
    e = subparsers.add_parser("eval", help="top-1 (and top-5) accuracy of a model on a validation set",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(e)
    e.add_argument("--data", default=None, help="'digits' or an ImageFolder root (default: what the checkpoint records)")
    e.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(run=run)


def run(args) -> int:
    from ..io.checkpoint import looks_like_path
    from ..engine.masks import bind_masks, removed_fraction
    from ..train import evaluate
    from ..train.distributed import cleanup, setup

    dist = setup(args.device)
    try:
        data_spec, split_seed = args.data, 0
        if data_spec is None and args.source is not None and looks_like_path(args.source):
            recorded = recorded_data(args.source)
            if recorded:
                data_spec, split_seed = recorded["data"], int(recorded.get("split_seed", 0))
        if data_spec is None and args.source is None:
            data_spec = "digits"
        if args.batch_size < 1:
            raise DimapError(f"--batch-size must be >= 1, got {args.batch_size}")
        loaded, data = prepare(args, data_spec, split_seed=split_seed)
        model = loaded.model
        bind_masks(model, loaded.masks)  # masks that do not fit the model are refused before evaluating
        result = evaluate(model, data.val, args.batch_size, dist, workers(args, data_spec))
        if dist.is_main:
            result = {**result, "model": loaded.source, "data": data.spec["data"], "removed": removed_fraction(loaded.masks)}
            if args.json:
                print(json.dumps(result))
            else:
                pruned = f", {result['removed']:.1%} of prunable weights removed" if loaded.masks else ", dense"
                print(f"{loaded.source}{pruned}, on {result['count']} {data.spec['data']} validation images")
                print(accuracy_line(result))
        return 0
    finally:
        cleanup(dist)


def recorded_data(path) -> dict | None:
    """The data settings a checkpoint written by finetune records, or None."""
    from safetensors import safe_open

    from ..io.models import decode_meta

    if not str(path).endswith(".safetensors") or not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("data")
    except Exception:
        return None  # load_model reports the damage in one line
    value = decode_meta(raw) if raw else None
    return value if isinstance(value, dict) and value.get("data") else None
