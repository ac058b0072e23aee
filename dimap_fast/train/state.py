"""A run on disk: ``train_state.safetensors`` (everything ``--resume`` needs) and the epoch's checkpoint meta.

Tensors (weights, masks, AdamW moments, RNG states) go in as tensors and the rest (recipe, history,
optimizer groups, the timm scheduler's settings) as JSON metadata, so no pickle is ever read back.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..io.checkpoint import load_state_dict, save_atomic
from ..errors import DimapError

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.safetensors"
# 2: timm's optimizer groups (no-decay first) and CosineLRScheduler settings; 1 held a LambdaLR
STATE_FORMAT = "dimap-fast/train-state-2"


@dataclass
class TrainState:
    """Everything ``--resume`` needs, as read from ``train_state.safetensors``."""

    run: dict
    epoch: int
    history: list
    model: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: list  # per rank


def rng_state(device: torch.device) -> dict:
    py = random.getstate()
    npy = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(py[1], dtype=torch.int64),
        "python_extra": [py[0], py[2]],
        "numpy": torch.from_numpy(npy[1].astype(np.int64)),
        "numpy_extra": [npy[0], int(npy[2]), int(npy[3]), float(npy[4])],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, gauss = state["python_extra"]
    random.setstate((version, tuple(int(v) for v in state["python"].tolist()), gauss))
    name, pos, has_gauss, cached = state["numpy_extra"]
    np.random.set_state((name, state["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def save_train_state(path, model, masks: dict, optimizer, scheduler, epoch: int, history: list, run: dict,
                     rngs: list[dict]) -> Path:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"mask.{k}": v for k, v in masks.items()})
    opt = optimizer.state_dict()
    for index, slots in opt["state"].items():
        for key, value in slots.items():
            tensors[f"optim.{index}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    extras = []
    for rank, rng in enumerate(rngs):
        for key, value in rng.items():
            if isinstance(value, torch.Tensor):
                tensors[f"rng.{rank}.{key}"] = value
        extras.append({k: v for k, v in rng.items() if not isinstance(v, torch.Tensor)})
    meta = {
        "format": STATE_FORMAT, "epoch": str(epoch), "run": json.dumps(run), "history": json.dumps(history),
        "optimizer": json.dumps(opt["param_groups"]), "scheduler": json.dumps(scheduler.state_dict()),
        "rng": json.dumps(extras),
    }
    return save_atomic(path, tensors, meta)


def load_train_state(path) -> TrainState:
    tensors, meta = load_state_dict(path)
    if meta.get("format") != STATE_FORMAT:
        raise DimapError(f"{path} is not a training state this version can resume (format {meta.get('format')!r}, "
                         f"expected {STATE_FORMAT!r}): start a new run with --overwrite")
    groups = json.loads(meta["optimizer"])
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    slots: dict[int, dict] = {}
    rngs = [dict(extra) for extra in json.loads(meta["rng"])]
    model, masks = {}, {}
    for key, value in tensors.items():
        kind, rest = key.split(".", 1)
        if kind == "model":
            model[rest] = value
        elif kind == "mask":
            masks[rest] = value.bool()
        elif kind == "optim":
            index, slot = rest.split(".", 1)
            slots.setdefault(int(index), {})[slot] = value
        elif kind == "rng":
            rank, slot = rest.split(".", 1)
            rngs[int(rank)][slot] = value
    return TrainState(json.loads(meta["run"]), int(meta["epoch"]), json.loads(meta["history"]), model, masks,
                      {"state": slots, "param_groups": groups}, json.loads(meta["scheduler"]), rngs)


def checkpoint_meta(run: dict, epoch: int, val: dict | None) -> dict:
    """The metadata of the epoch's model.safetensors: what eval, report and prune read back."""
    meta = {"source": run.get("source", ""), "epoch": epoch, "epochs": run["recipe"]["epochs"],
            "finetune": run["recipe"], "data": run["data"]}
    meta.update({k: v for k, v in run.get("prune", {}).items()})
    arch = run.get("arch", {})
    if "model_config" in arch:
        meta["model_config"] = arch["model_config"]
    elif "timm_model" in arch:
        meta["timm_model"] = arch["timm_model"]
        meta["num_classes"] = arch.get("num_classes")
    if val is not None:
        meta["val_top1"] = val["top1"]
        if val["top5"] is not None:
            meta["val_top5"] = val["top5"]
    return {k: v for k, v in meta.items() if v is not None}
