"""The one training loop: fine-tuning a pruned model, the demo model's training, the accuracy experiment.

``train`` runs AdamW (timm's factory) with timm's warm-up + cosine schedule stepped every batch, the
masks held by ``masks.MaskHandle`` and checked after every step (``MaskLeakError``), one process or
DDP under torchrun (``distributed``). With ``out_dir`` it writes model.safetensors and
train_state.safetensors after every epoch (rank 0, atomically); ``resume`` continues such a run bit for
bit: weights, masks, AdamW moments, the step count that drives the schedule, and every process's RNG.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from ..io.checkpoint import save_pruned
from ..errors import DimapError
from ..engine.masks import MaskHandle, removed_fraction
from .data import Data
from .distributed import Dist
from .evaluate import evaluate, flush_denormals
from .recipe import PAPER_RECIPE, Recipe, make_optimizer, make_scheduler
from .state import (
    MODEL_FILE, STATE_FILE, TrainState, checkpoint_meta, rng_state, save_train_state, seed_everything, set_rng_state,
)


def train(model: torch.nn.Module, data: Data, recipe: Recipe = PAPER_RECIPE, masks=None, *,
          out_dir=None, run: dict | None = None, resume: TrainState | None = None, stop_after: int | None = None,
          seed: int = 0, dist: Dist | None = None, workers: int = 0, progress: bool = True,
          eval_every_epoch: bool = True, log=print) -> dict:
    """Train ``model`` on ``data.train`` with ``masks`` (True = kept) held fixed; returns the history.

    ``data.val`` (if any) is evaluated after every epoch (``eval_every_epoch``) or after the last.
    ``out_dir``: write model.safetensors and train_state.safetensors there after every epoch (rank 0).
    ``resume``: a TrainState to continue (its weights, masks, optimizer, schedule and RNG replace
    the given ones). ``stop_after``: end once that epoch is done and saved, as if interrupted.
    Returns {"history": [per-epoch dicts], "epoch": epochs done, "stopped": bool, "val": last eval,
    "removed": fraction of the masked weights that are pruned}.
    """
    recipe.check()
    dist = dist or Dist()
    log = log if (log is not None and dist.is_main) else (lambda *a, **k: None)
    device = dist.device
    run = dict(run or {})
    run.setdefault("recipe", asdict(recipe))
    run.setdefault("seed", seed)
    run.setdefault("data", data.spec)
    run["world_size"] = dist.world_size
    if resume is not None:
        if len(resume.rng) != dist.world_size:
            # another split of each epoch and another step count: the schedule and the data order would not continue
            raise DimapError(f"the run was saved by {len(resume.rng)} process(es): resume it with as many "
                             f"(torchrun --nproc_per_node ... in all {len(resume.rng)}), not {dist.world_size}")
        model.load_state_dict(resume.model)
        masks = resume.masks
    model.to(device)
    # every process trains rank 0's masks (they agree anyway when the weights do)
    masks = {name: dist.broadcast_(keep.to(device, torch.uint8)).bool() for name, keep in (masks or {}).items()}
    with MaskHandle(model, masks) as guard:
        guard.check("before training")
        return _epochs(model, data, recipe, guard, out_dir, run, resume, stop_after, seed, dist, workers, progress,
                       eval_every_epoch, log)


def _epochs(model, data: Data, recipe: Recipe, guard: MaskHandle, out_dir, run, resume, stop_after, seed,
            dist: Dist, workers, progress, eval_every_epoch, log) -> dict:
    device = dist.device
    net = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = DistributedSampler(data.train, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed)
    loader = DataLoader(data.train, batch_size=recipe.batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise DimapError("the training set is empty: give it at least one image")
    optimizer = make_optimizer(model, recipe)  # the bare model: its parameter names and no_weight_decay()
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch)

    history: list = []
    start_epoch = 0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)  # the LR of the next step included
        scheduler.load_state_dict(resume.scheduler)
        history, start_epoch = list(resume.history), resume.epoch
        set_rng_state(resume.rng[dist.rank], device)
    else:
        seed_everything(seed + dist.rank)  # drop-path and augmentation differ by rank; shuffling is the sampler's

    out_dir = Path(out_dir) if out_dir is not None else None
    val = history[-1].get("val") if history else None
    stopped = False
    with flush_denormals():
        for epoch in range(start_epoch, recipe.epochs):
            started = time.perf_counter()
            sampler.set_epoch(epoch)
            loss, acc = _train_epoch(net, loader, optimizer, scheduler, guard, recipe, dist, epoch, progress)
            last = epoch + 1 == recipe.epochs
            val = None
            if data.val is not None and (eval_every_epoch or last):
                val = evaluate(model, data.val, 2 * recipe.batch_size, dist, workers)
            net.train()
            entry = {"epoch": epoch + 1, "loss": loss, "train_top1": acc, "lr": optimizer.param_groups[0]["lr"],
                     "seconds": round(time.perf_counter() - started, 3), "val": val}
            history.append(entry)
            if out_dir is not None:
                rngs = dist.gather_objects(rng_state(device))
                if dist.is_main:
                    kept = guard.masks
                    save_train_state(out_dir / STATE_FILE, model, kept, optimizer, scheduler, epoch + 1, history,
                                     run, rngs)
                    save_pruned(out_dir / MODEL_FILE, _cpu_state(model), kept, checkpoint_meta(run, epoch + 1, val))
                dist.barrier()
            log(epoch_line(entry, recipe.epochs))
            if stop_after is not None and epoch + 1 >= stop_after and not last:
                stopped = True
                log(f"stopped after epoch {epoch + 1} of {recipe.epochs}" +
                    (f": continue with --resume --out {out_dir}" if out_dir is not None else ""))
                break
    model.eval()
    done = history[-1]["epoch"] if history else 0
    return {"history": history, "epoch": done, "stopped": stopped, "val": val, "removed": removed_fraction(guard.masks)}


def _train_epoch(net, loader, optimizer, scheduler, guard: MaskHandle, recipe: Recipe, dist: Dist, epoch: int,
                 progress: bool) -> tuple[float, float]:
    from tqdm.auto import tqdm

    net.train()
    device = dist.device
    steps_done = epoch * len(loader)  # the schedule is a function of the step count, so a resume continues it
    loss_sum = 0.0
    correct = seen = 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{recipe.epochs}", disable=not (progress and dist.is_main),
               leave=False, dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = net(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # the guard's hooks keep gradients off pruned weights
        optimizer.step()  # ... and re-zero them after the step
        scheduler.step_update(steps_done + step + 1)
        guard.check(f"after step {step + 1} of epoch {epoch + 1}")
        loss_sum += float(loss.detach()) * labels.numel()
        correct += int((logits.detach().argmax(1) == labels).sum())
        seen += labels.numel()
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.2%}", refresh=False)
    bar.close()
    loss_sum, correct, seen = dist.sum([loss_sum, correct, seen])
    return loss_sum / seen, correct / seen


def _cpu_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def epoch_line(entry: dict, epochs: int) -> str:
    line = (f"epoch {entry['epoch']}/{epochs}  loss {entry['loss']:.4f}  train {entry['train_top1']:.2%}  "
            f"lr {entry['lr']:.2e}  {entry['seconds']:.1f}s")
    if entry["val"] is not None:
        line += f"  val top-1 {entry['val']['top1']:.2%}"
        if entry["val"]["top5"] is not None:
            line += f"  top-5 {entry['val']['top5']:.2%}"
    return line
