"""Top-1 / top-5 accuracy of a model over a dataset, one process or shared over many."""

from __future__ import annotations

import contextlib

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import DimapError
from .distributed import Dist


@contextlib.contextmanager
def flush_denormals():
    """Treat denormal floats as zero inside the block, then restore the caller's setting.

    Swin's shifted-window mask adds -100 before the softmax, and exp(-100) ~ 4e-44 is a denormal:
    on x86 CPUs every op touching those runs 10-20x slower. Flushing them changes nothing a
    float32 model can notice (they are below 1.2e-38) and turns minutes of training into seconds.
    """
    was_on = float(torch.tensor([1e-39]).mul(1.0)) == 0.0  # torch has no getter for the flag
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset, batch_size: int = 256, dist: Dist | None = None,
             workers: int = 0) -> dict:
    """{"top1", "top5" (None with 5 classes or fewer), "correct", "count"} over ``dataset``.

    Each process takes every world_size-th image, so no image is counted twice. Leaves the model
    in eval mode on ``dist.device``.
    """
    dist = dist or Dist()
    if isinstance(dataset, DataLoader):
        raise DimapError("evaluate takes a Dataset (it makes its own loader), got a DataLoader: pass loader.dataset")
    shard = Subset(dataset, range(dist.rank, len(dataset), dist.world_size))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=workers, pin_memory=dist.device.type == "cuda")
    model.eval().to(dist.device)
    top1 = top5 = seen = 0
    classes = int(getattr(model, "num_classes", 0) or 0)
    with flush_denormals():
        for images, labels in loader:
            logits = model(images.to(dist.device, non_blocking=True))
            labels = labels.to(dist.device)
            classes = logits.shape[1]
            best = logits.topk(min(5, classes), dim=1).indices
            top1 += int((best[:, 0] == labels).sum())
            top5 += int((best == labels[:, None]).any(1).sum())
            seen += labels.numel()
    top1, top5, seen = dist.sum([top1, top5, seen])
    if seen == 0:
        raise DimapError("the evaluation set is empty: give it at least one image")
    return {"top1": top1 / seen, "top5": top5 / seen if classes > 5 else None, "correct": int(top1), "count": int(seen)}
