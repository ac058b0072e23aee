"""DIMAP against its baselines on real data: accuracy one-shot and after a short fine-tune.

The small Swin of the demo (0.3M parameters, scikit-learn's digits at 32x32) is trained with the
demo's recipe (``DEMO_RECIPE``: 20 epochs, AdamW 3e-3, batch 32) once per seed; seed s also draws
the train/val split, so the spread covers data as well as initialisation. Each model is then pruned
by every method at every ratio and evaluated as it is (one-shot) and after ``dimap-fast finetune``'s
digits recipe (3 epochs, masks held). Training and fine-tuning both run ``dimap_fast.train.train``,
the loop the command runs.

Methods: dimap, global, uniform (unstructured, the paper's Table 3 baselines), block16 (dimap
scores over 16x16 tiles) and channel (dimap over MLP neurons and attention heads).

Writes accuracy.csv (one row per seed, method, ratio), accuracy.md (tables and the issue's
targets), accuracy.png and kept_per_layer.png into --out-dir (default docs/accuracy/). Dense models
are cached in --cache-dir, so a rerun only prunes and fine-tunes.

    .venv/bin/python bench/accuracy.py            # the full run: 19 min on one thread of a busy 2-core machine
    .venv/bin/python bench/accuracy.py --quick    # a smoke run (under a minute): 1 seed, 2 ratios, into out/accuracy-quick/
    .venv/bin/python bench/accuracy.py --replot   # tables and figures again from accuracy.csv and run.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from accuracy_report import KEPT_RATIOS, plot_accuracy, plot_kept, read_csv, summarise, write_csv, write_markdown
from dimap_fast.engine.masks import masked_copy, removed_fraction
from dimap_fast.engine.plan import plan
from dimap_fast.train import (
    DEMO_RECIPE, DIGITS_RECIPE, Data, build_swin, digits_datasets, evaluate, small_swin_config, train,
)

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "dimap": {"method": "dimap"},
    "global": {"method": "global"},
    "uniform": {"method": "uniform"},
    "block16": {"method": "dimap", "pattern": "block", "block_size": 16},
    "channel": {"method": "dimap", "pattern": "channel"},
}
RATIOS = (0.15, 0.35, 0.5, 0.55, 0.7, 0.8, 0.9)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated (default 0,1,2)")
    p.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="comma-separated fractions removed")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--ft-epochs", type=int, default=DIGITS_RECIPE.epochs, help="fine-tune epochs (default 3)")
    p.add_argument("--ft-lr", type=float, default=DIGITS_RECIPE.lr, help="fine-tune peak LR (default 5e-4)")
    p.add_argument("--dense-epochs", type=int, default=DEMO_RECIPE.epochs, help="training epochs of the dense models")
    p.add_argument("--out-dir", type=Path, default=None, help="default docs/accuracy (out/accuracy-quick with --quick)")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "out" / "accuracy-cache", help="trained dense models")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: this machine shares its cores)")
    p.add_argument("--replot", action="store_true", help="redo the tables and figures from accuracy.csv and run.json")
    p.add_argument("--quick", action="store_true", help="smoke run: seed 0, ratios 0.5,0.8, 3 dense epochs, 1 fine-tune epoch on 256 images")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}: choose from {', '.join(METHODS)}")
    args.ft_max_train = None
    if args.quick:
        args.seeds, args.ratios, args.dense_epochs, args.ft_epochs, args.ft_max_train = [0], [0.5, 0.8], 3, 1, 256
    if args.out_dir is None:
        args.out_dir = ROOT / ("out/accuracy-quick" if args.quick else "docs/accuracy")
    return args


# ----------------------------------------------------------------------------- models


def dense_model(seed: int, data, epochs: int, cache_dir: Path) -> tuple[torch.nn.Module, float]:
    """The small Swin trained on split ``seed`` from init ``seed``; cached as safetensors."""
    from safetensors.torch import load_file, save_file

    config = small_swin_config()
    path = _cache_path(cache_dir, seed, epochs)
    model = build_swin(config)
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval(), 0.0
    torch.manual_seed(seed)
    model = build_swin(config)
    started = time.perf_counter()
    recipe = replace(DEMO_RECIPE, epochs=epochs, warmup_epochs=min(DEMO_RECIPE.warmup_epochs, epochs))
    train(model, Data(data.train, None, 10), recipe, seed=seed, progress=False, log=None)
    seconds = time.perf_counter() - started
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"config": json.dumps(config), "seconds": f"{seconds:.1f}"})
    return model.eval(), seconds


# ----------------------------------------------------------------------------- the sweep


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    recipe = replace(DIGITS_RECIPE, epochs=args.ft_epochs, lr=args.ft_lr,
                     warmup_epochs=DIGITS_RECIPE.warmup_epochs * args.ft_epochs / DIGITS_RECIPE.epochs)
    rows = []
    started = time.perf_counter()
    train_seconds = []
    for seed in args.seeds:
        train_set, val_set = digits_datasets(image_size=32, seed=seed)
        data = Data(train_set, val_set, 10, {"data": "digits", "split_seed": seed})
        ft_data = Data(_limit(train_set, args.ft_max_train), val_set, 10, data.spec)
        model, seconds = dense_model(seed, data, args.dense_epochs, args.cache_dir)
        if seconds:
            train_seconds.append(seconds)
        dense = evaluate(model, val_set)["top1"]
        tuned = _finetune(model, {}, ft_data, recipe, seed)
        rows.append(_row(seed, "dense", 0.0, 0.0, dense, tuned))
        _say(started, f"seed {seed}: dense {dense:.2%}, dense after the same fine-tune {tuned:.2%}"
                      + (f" (trained in {seconds:.0f} s)" if seconds else " (cached)"))
        for method in args.methods:
            p = plan(model, **METHODS[method])
            for ratio in args.ratios:
                masks = p.masks(ratio)
                pruned = masked_copy(model, masks)
                one_shot = evaluate(pruned, val_set)["top1"]
                tuned = _finetune(pruned, masks, ft_data, recipe, seed)
                rows.append(_row(seed, method, ratio, removed_fraction(masks), one_shot, tuned))
                _say(started, f"seed {seed} {method:<8} {ratio:.2f}: one-shot {one_shot:.2%}  fine-tuned {tuned:.2%}")
        write_csv(args.out_dir / "accuracy.csv", rows)  # after every seed: a crash keeps what is done
    return {"seconds": round(time.perf_counter() - started, 1), "train_seconds": [round(t, 1) for t in train_seconds],
            "recipe": asdict(recipe), "threads": args.threads}


def kept_per_layer(seeds, epochs: int, cache_dir: Path) -> tuple[dict, list]:
    """Kept fraction of every prunable layer under dimap at KEPT_RATIOS, per seed (cached models only)."""
    from safetensors.torch import load_file

    kept, names = {r: [] for r in KEPT_RATIOS}, []
    for seed in seeds:
        path = _cache_path(cache_dir, seed, epochs)
        if not path.is_file():
            continue
        model = build_swin(small_swin_config())
        model.load_state_dict(load_file(str(path)))
        p = plan(model, method="dimap")
        for r in KEPT_RATIOS:
            layers = p.sparsity(r)["layers"]
            names = list(layers)
            kept[r].append([1.0 - v for v in layers.values()])
    return kept, names


def _limit(dataset, n):
    if n is None or n >= len(dataset):
        return dataset
    from torch.utils.data import Subset

    return Subset(dataset, range(n))


def _cache_path(cache_dir: Path, seed: int, epochs: int) -> Path:
    # "loop2": trained by the shared loop (timm's AdamW and schedule); older cached models came from another
    return cache_dir / f"digits_swin_seed{seed}_e{epochs}_loop2.safetensors"


def _finetune(model, masks, data, recipe, seed) -> float:
    model = copy.deepcopy(model)
    result = train(model, data, recipe, masks, seed=seed, progress=False, eval_every_epoch=False, log=None)
    return result["val"]["top1"]


def _row(seed, method, ratio, removed, one_shot, tuned) -> dict:
    return {"seed": seed, "method": method, "ratio": ratio, "removed": round(removed, 6),
            "one_shot": round(one_shot, 6), "finetuned": round(tuned, 6)}


def _say(started, text) -> None:
    print(f"[{time.perf_counter() - started:6.0f} s] {text}", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    info_path = args.out_dir / "run.json"
    if not args.replot:
        info = run(args)
        info.update({"command": " ".join(["python bench/accuracy.py", *(sys.argv[1:] if argv is None else argv)]),
                     "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
                     "torch": torch.__version__, "seeds": args.seeds, "dense_epochs": args.dense_epochs,
                     "ft_max_train": args.ft_max_train})
        info_path.write_text(json.dumps(info, indent=1) + "\n")
    elif not info_path.is_file() or not (args.out_dir / "accuracy.csv").is_file():
        raise SystemExit(f"--replot needs {info_path} and accuracy.csv from an earlier run")
    info = json.loads(info_path.read_text())
    rows = read_csv(args.out_dir / "accuracy.csv")
    stats = summarise(rows)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    ratios = sorted({r["ratio"] for r in rows if r["method"] != "dense"})
    plot_accuracy(args.out_dir / "accuracy.png", stats, methods, ratios, info["recipe"]["epochs"])
    kept, names = kept_per_layer(info["seeds"], info["dense_epochs"], args.cache_dir)
    if names:
        plot_kept(args.out_dir / "kept_per_layer.png", kept, names)
    write_markdown(args.out_dir / "accuracy.md", info, rows, stats, methods, ratios)
    print((args.out_dir / "accuracy.md").read_text())


if __name__ == "__main__":
    main()
