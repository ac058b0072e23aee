"""One process or many: what fine-tuning needs to know about torchrun.

Under ``torchrun --nproc_per_node=N`` (one node or several, with torchrun's usual
``--nnodes/--node_rank/--master_addr/--master_port`` or ``--rdzv_*`` flags) every process finds
RANK, WORLD_SIZE and LOCAL_RANK in its environment; ``setup()`` reads them, joins the process group
(nccl for GPUs, gloo on the CPU) and picks the process's device. Without them it returns a
single-process ``Dist`` and touches nothing, so the same training code serves both cases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist

from ..errors import DimapError

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Dist:
    """This process's place in the run: rank, world size, device; collectives no-op alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # setup() joined the group, so cleanup() leaves it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def sum(self, values) -> list[float]:
        """Element-wise sum of a list of numbers over all processes (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.enabled:
            torch_dist.all_reduce(t)
        return t.tolist()

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` on every process with rank ``src``'s copy (in place)."""
        if self.enabled:
            torch_dist.broadcast(tensor, src)
        return tensor

    def gather_objects(self, obj) -> list:
        """Every process's ``obj`` in rank order, on every process."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device not in DEVICES:
        raise DimapError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DimapError("--device cuda, but torch sees no GPU here: use --device cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    # torchrun sets RANK and WORLD_SIZE for every process, one process (nproc_per_node=1) too
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: str = "auto") -> Dist:
    """Join the torchrun process group when there is one; otherwise a single-process Dist."""
    if not launched_by_torchrun():
        return Dist(device=pick_device(device))
    try:
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as exc:
        raise DimapError(f"WORLD_SIZE is set but RANK/LOCAL_RANK are not usable ({exc}): start with torchrun") from None
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if not torch_dist.is_initialized():
        # nccl only moves CUDA tensors; gloo is the CPU's backend
        torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
        owns = True
    return Dist(rank, world_size, local_rank, dev, owns)


def cleanup(d: Dist) -> None:
    if d.owns_group and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
        d.owns_group = False
