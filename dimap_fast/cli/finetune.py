"""``dimap-fast finetune``: train a pruned model with its masks held fixed (``train.train``), resumably.

The model is a pruned checkpoint (masks under ``dimap_mask.``), a dense one plus ``--ratio`` to prune
first, or a timm name. The recipe's defaults are the paper's, which are Swin's 30-epoch fine-tune:
LR 2e-5 (used as given; Swin's code scales it by total batch / 512, the same at 8 processes of 64),
warm-up 5 epochs from 2e-8, cosine to 2e-7, weight decay 1e-8 (none on norms, biases, position
tables), label smoothing 0.1; timm's standard train transform, no mixup. ``--data digits`` has its
own short recipe (``DIGITS_RECIPE``). Every epoch writes model.safetensors and
train_state.safetensors into ``--out``; ``--resume`` continues a stopped run bit for bit.

Under ``torchrun`` the same command runs DDP (``train.distributed``): each process takes its share of
every epoch, gradients are averaged, rank 0 alone prints and writes. ``--batch-size`` is per process
and the LR is used as given (no scaling by world size). ``eval`` shares ``model_args`` and
``prepare`` from here.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields, replace
from pathlib import Path

from ..engine.values import METHODS, Pattern
from ..errors import DimapError
from .args import pattern_args, ratio

EXAMPLES = """\
examples:
  dimap-fast finetune --data digits --ratio 0.7 --out runs/digits70        the shipped digits Swin, 3 epochs
  dimap-fast finetune tiny50.safetensors --data /data/imagenet --out runs/tiny50   the paper's 30-epoch recipe
  dimap-fast finetune swin_tiny_patch4_window7_224 --pretrained --ratio 0.5 --data /data/pets --out runs/pets
  dimap-fast finetune --resume --out runs/tiny50                           continue a stopped run exactly
  torchrun --nproc_per_node=8 -m dimap_fast.cli finetune tiny50.safetensors --data /data/imagenet --out runs/t50
"""

RECIPE_FLAGS = {  # flag -> (Recipe field, type, help)
    "--epochs": ("epochs", int, "epochs in all"),
    "--lr": ("lr", float, "peak learning rate, reached after warm-up"),
    "--min-lr": ("min_lr", float, "where the cosine ends"),
    "--warmup-lr": ("warmup_lr", float, "where the warm-up starts"),
    "--warmup-epochs": ("warmup_epochs", float, "length of the linear warm-up, fractions allowed "
                                                "(default with --epochs: the recipe's share of the run)"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay (not on norms, biases, position tables)"),
    "--batch-size": ("batch_size", int, "images per step and process"),
    "--label-smoothing": ("label_smoothing", float, "cross-entropy label smoothing"),
}


def model_args(p) -> None:
    """MODEL and the flags that load it, prune it first and place it: finetune and eval share them."""
    from ..train.distributed import DEVICES

    p.add_argument("source", nargs="?", default=None,
                   help="checkpoint (.safetensors from prune/finetune, or dense .safetensors/.pth) or timm name; "
                        "default with --data digits: the shipped digits Swin")
    p.add_argument("--model", help="timm architecture of a checkpoint that does not record it")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights for a model name")
    p.add_argument("--ratio", type=ratio, default=None, help="prune a dense model first: fraction of each module to remove")
    p.add_argument("--method", choices=METHODS, default=None, help="with --ratio: dimap (default), global or uniform")
    pattern_args(p, default=None, when="with --ratio: ")  # unstructured when not given
    p.add_argument("--workers", type=int, default=None, help="data-loading processes (default 0 for digits, 4 for folders)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto (cuda:LOCAL_RANK when there is a GPU), cpu, cuda")
    p.add_argument("--max-val-samples", type=int, default=None, help="evaluate on a fixed random subset of val")


def add_parser(subparsers) -> None:
    from ..train import DIGITS_RECIPE, PAPER_RECIPE

    f = subparsers.add_parser(
        "finetune", help="fine-tune a pruned model with its masks held fixed (torchrun for several GPUs)",
        description="Fine-tune with pruned weights held at zero: AdamW, linear warm-up, cosine decay; the defaults "
                    "are the paper's recipe (Swin's 30-epoch fine-tune), --data digits has a short one of its own.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(f)
    f.add_argument("--data", default=None, help="'digits' or a folder holding train/CLASS/IMAGE and val/CLASS/IMAGE")
    f.add_argument("--out", required=True, help="run folder: model.safetensors and train_state.safetensors, every epoch")
    for flag, (name, kind, text) in RECIPE_FLAGS.items():
        f.add_argument(flag, type=kind, default=None,
                       help=f"{text} (default {getattr(PAPER_RECIPE, name):g}; digits {getattr(DIGITS_RECIPE, name):g})")
    f.add_argument("--seed", type=int, default=None, help="seed of shuffling, drop-path and augmentation (default 0)")
    f.add_argument("--resume", action="store_true", help="continue the run in --out from its last saved epoch, as if it had never stopped")
    f.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
    f.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="stop once this epoch is saved, as if interrupted (--resume continues)")
    f.add_argument("--reset-head", action="store_true", help="replace a checkpoint's classifier when the class count differs")
    f.add_argument("--max-train-samples", type=int, default=None, help="train on a fixed random subset")
    f.add_argument("--no-progress", action="store_true", help="no progress bars, epoch lines only")
    f.add_argument("--save-rank-weights", default=None, metavar="DIR",
                   help="every process also writes its final weights to DIR/rankN.safetensors (to check DDP replicas)")
    f.set_defaults(run=run)


def _recipe_text(recipe) -> str:
    return ", ".join(f"--{f.name.replace('_', '-')} {getattr(recipe, f.name):g}" for f in fields(recipe))


def _prune_args(args) -> dict:
    pattern = args.pattern or Pattern.unstructured()
    return {"method": args.method or "dimap", "pattern": pattern.name, "block_size": pattern.block_size}


def _check_prune_flags(args) -> None:
    if args.ratio is None and any(v is not None for v in (args.method, args.pattern)):
        raise DimapError("--method, --pattern and --block-size choose how to prune: give --ratio too")


def prepare(args, data_spec: str | None, max_train: int | None = None, split_seed: int = 0):
    """(Loaded model, Data) for a command's MODEL, --data and pruning flags."""
    from ..io.models import fit_head, load_model, model_image_size, prune_model
    from ..train import load_data

    _check_prune_flags(args)
    loaded = load_model(args.source, data_spec, args.model, args.pretrained)
    if data_spec is None:
        raise DimapError("--data is needed: 'digits' or a folder with train/ and val/")
    data = load_data(data_spec, model_image_size(loaded.model), max_train, args.max_val_samples, split_seed)
    fit_head(loaded, data.num_classes, getattr(args, "reset_head", False))
    if args.ratio is not None:
        prune_model(loaded, args.ratio, **_prune_args(args))
    return loaded, data


def workers(args, data_spec) -> int:
    if args.workers is not None:
        if args.workers < 0:
            raise DimapError(f"--workers must be >= 0, got {args.workers}")
        return args.workers
    return 0 if data_spec == "digits" else 4


def run(args) -> int:
    from ..train.distributed import cleanup, setup

    dist = setup(args.device)
    try:
        return _finetune(args, dist)
    finally:
        cleanup(dist)


def _finetune(args, dist) -> int:
    import torch

    from ..io.checkpoint import save_atomic
    from ..io.models import build_model
    from ..engine.masks import removed_fraction
    from ..train import DIGITS_RECIPE, MODEL_FILE, PAPER_RECIPE, STATE_FILE, Recipe, load_data, load_train_state, train

    log = print if dist.is_main else None
    out = Path(args.out)
    state_path = out / STATE_FILE
    if args.stop_after is not None and args.stop_after < 1:
        raise DimapError(f"--stop-after must be an epoch number >= 1, got {args.stop_after}")
    if args.resume:
        if args.overwrite:
            raise DimapError("--resume continues the run in --out, --overwrite starts it over: pick one")
        if not state_path.is_file():
            raise DimapError(f"{out} holds no run to resume ({STATE_FILE} is missing): start one without --resume")
        state = load_train_state(state_path)
        run = state.run
        _check_resume_flags(args, run)
        recipe = Recipe(**run["recipe"]).check()
        if state.epoch >= recipe.epochs:
            if log:
                log(f"{out} finished all {recipe.epochs} epochs already: nothing to resume")
            return 0
        spec = run["data"]
        data = load_data(spec["data"], spec["image_size"], spec.get("max_train_samples"),
                         spec.get("max_val_samples"), spec.get("split_seed", 0))
        model = build_model({**run["arch"], "pretrained": False})  # weights come from the state
        if log:
            log(f"resuming {out} after epoch {state.epoch} of {recipe.epochs}")
        result = train(model, data, recipe, out_dir=out, run=run, resume=state, stop_after=args.stop_after,
                       seed=run["seed"], dist=dist, workers=workers(args, spec["data"]),
                       progress=not args.no_progress, log=log)
    else:
        if state_path.exists() and not args.overwrite:
            raise DimapError(f"{out} holds a run already: pass --resume to continue it or --overwrite to start over")
        if out.exists() and not out.is_dir():
            raise DimapError(f"--out {out} is a file: name a folder for the run")
        if not out.parent.is_dir():
            raise DimapError(f"the folder above --out ({out.parent}) does not exist: create it first")
        data_spec = args.data
        if data_spec is None:
            raise DimapError("--data is needed: 'digits' or a folder with train/ and val/ class subfolders")
        base = DIGITS_RECIPE if data_spec == "digits" else PAPER_RECIPE
        given = {name: getattr(args, name) for name, *_ in RECIPE_FLAGS.values() if getattr(args, name) is not None}
        if "epochs" in given and "warmup_epochs" not in given:  # warm up for the same share of a longer or shorter run
            given["warmup_epochs"] = base.warmup_epochs * given["epochs"] / base.epochs
        recipe = replace(base, **given).check()
        seed = 0 if args.seed is None else args.seed
        torch.manual_seed(seed)  # the same initial weights (and so the same masks) on every process
        loaded, data = prepare(args, data_spec, args.max_train_samples)
        out.mkdir(exist_ok=True)
        run = {"source": loaded.source, "arch": loaded.arch, "prune": loaded.prune, "data": data.spec,
               "recipe": asdict(recipe), "seed": seed}
        if log:
            removed = removed_fraction(loaded.masks)
            log(f"fine-tuning {loaded.source} ({removed:.1%} of prunable weights removed) on {data.spec['data']}: "
                f"{len(data.train)} train / {len(data.val)} val images, {dist.world_size} process(es) on {dist.device}; "
                f"{_recipe_text(recipe)}")
        result = train(loaded.model, data, recipe, loaded.masks, out_dir=out, run=run, stop_after=args.stop_after,
                       seed=seed, dist=dist, workers=workers(args, data_spec), progress=not args.no_progress,
                       log=log)
    if args.save_rank_weights:
        folder = Path(args.save_rank_weights)
        folder.mkdir(parents=True, exist_ok=True)
        model_state = {k: v.detach().cpu() for k, v in (model if args.resume else loaded.model).state_dict().items()}
        save_atomic(folder / f"rank{dist.rank}.safetensors", model_state, {"epoch": str(result["epoch"])})
    if log and not result["stopped"] and result["val"] is not None:
        log(accuracy_line(result["val"]) + f"  (wrote {out / MODEL_FILE})")
    return 0


def _check_resume_flags(args, run: dict) -> None:
    given = {flag: getattr(args, name) for flag, (name, *_) in RECIPE_FLAGS.items() if getattr(args, name) is not None}
    stored = {flag: run["recipe"][name] for flag, (name, *_) in RECIPE_FLAGS.items()}
    for flag, value in given.items():
        if value != stored[flag]:
            _resume_conflict(flag, value, stored[flag])
    if args.seed is not None and args.seed != run["seed"]:
        _resume_conflict("--seed", args.seed, run["seed"])
    if args.data is not None:
        want = args.data if args.data == "digits" else str(Path(args.data).expanduser().resolve())
        if want != run["data"]["data"]:
            _resume_conflict("--data", args.data, run["data"]["data"])
    if args.source is not None and args.source != run["source"]:
        _resume_conflict("MODEL", args.source, run["source"])
    if args.ratio is not None or args.max_train_samples is not None or args.max_val_samples is not None:
        raise DimapError("--resume takes the model, its masks and the data subset from the stopped run: "
                         "drop --ratio and --max-*-samples")


def _resume_conflict(flag, value, stored) -> None:
    raise DimapError(f"{flag} {value} differs from the run being resumed ({stored}): --resume continues that run "
                     "exactly; drop the flag, or start a new run in another --out")


def accuracy_line(val: dict) -> str:
    line = f"top-1 {val['top1']:.2%} ({val['correct']}/{val['count']})"
    if val["top5"] is not None:
        line += f"  top-5 {val['top5']:.2%}"
    return line
