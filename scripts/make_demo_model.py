"""Train the tiny digits Swin and write dimap_fast/assets/digits_swin.safetensors.

The checkpoint ships with the package so the demo and the tests need no download and no GPU.
Run from the repository root: ``PYTHONPATH=. python scripts/make_demo_model.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from dimap_fast.train import DEMO_ASSET, DEMO_RECIPE, Data, build_swin, evaluate, small_swin_config, train
from dimap_fast.train.data import DIGITS_MEAN, DIGITS_STD, digits_datasets

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "dimap_fast" / "assets" / DEMO_ASSET


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=DEMO_RECIPE.epochs)
    parser.add_argument("--lr", type=float, default=DEMO_RECIPE.lr)
    parser.add_argument("--batch-size", type=int, default=DEMO_RECIPE.batch_size)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def save_atomically(state: dict, metadata: dict, out: Path) -> None:
    # A crash mid-write must never leave a truncated checkpoint where the package looks for one.
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a shipped asset must be readable
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> None:
    args = parse_args(argv)
    data = {"dataset": "sklearn-digits", "image_size": 32, "seed": args.seed, "val_fraction": 0.25,
            "mean": DIGITS_MEAN, "std": DIGITS_STD}
    train_set, val_set = digits_datasets(data["image_size"], data["seed"], data["val_fraction"])
    config = small_swin_config(num_classes=10, image_size=data["image_size"])

    recipe = replace(DEMO_RECIPE, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)

    torch.manual_seed(args.seed)
    model = build_swin(config)
    start = time.perf_counter()
    result = train(model, Data(train_set, None, 10), recipe, seed=args.seed, progress=not args.no_progress, log=None)
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, val_set)["top1"]

    metadata = {
        "config": json.dumps(config),
        "data": json.dumps(data),
        "train": json.dumps(asdict(recipe)),
        "val_accuracy": f"{accuracy:.6f}",
        "train_accuracy": f"{result['history'][-1]['train_top1']:.6f}",
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_atomically(state, metadata, args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"val accuracy {accuracy:.4f}  train time {seconds:.1f} s  params {params:,}  "
          f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
