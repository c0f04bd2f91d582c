"""Process groups and the collectives the sharded model and the engine use, in one place: torch.distributed with
gloo on CPU and NCCL on CUDA (both shipped with torch; NCCL is only touched when the device is a GPU).

`Comm` counts the bytes each collective moves (`CommStats`), which is how docs/parallelism.md measures the
communication volume per decode step."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

# Rank 0 waits for its workers only while they compute the same step; a worker waits for rank 0 while the server
# is idle, which may be days.
ENGINE_TIMEOUT = timedelta(minutes=30)
WORKER_TIMEOUT = timedelta(days=365)


class WorkerDied(RuntimeError):
    """A tensor-parallel worker is gone (or stopped answering): the engine cannot run another step."""


@dataclass
class CommStats:
    all_reduce_bytes: int = 0
    all_gather_bytes: int = 0  # what this rank contributes
    calls: dict = field(default_factory=dict)

    def count(self, kind: str, nbytes: int) -> None:
        setattr(self, f"{kind}_bytes", getattr(self, f"{kind}_bytes") + nbytes)
        self.calls[kind] = self.calls.get(kind, 0) + 1


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init(rank: int, world_size: int, device: torch.device, init_method: str | None = None,
         store: dist.Store | None = None) -> Comm:
    """Join the process group (init_method: e.g. "file:///tmp/x" or "tcp://host:port", or a `store` the ranks
    share; neither reads torchrun's environment) and return the group's Comm."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    where = {"store": store} if store is not None else {"init_method": init_method or "env://"}
    dist.init_process_group(backend_for(device), rank=rank, world_size=world_size,
                            timeout=ENGINE_TIMEOUT if rank == 0 else WORKER_TIMEOUT, **where)
    return Comm(rank, world_size, device)


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun (or any launcher setting its variables)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    return None


class Comm:
    """The collectives of one tensor-parallel group (the default group: one model instance spans all ranks)."""

    def __init__(self, rank: int, size: int, device: torch.device):
        self.rank, self.size, self.device = rank, size, device
        self.stats = CommStats()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.stats.count("all_reduce", x.numel() * x.element_size())
        dist.all_reduce(x)
        return x

    def all_reduce_hook(self, module, args, out: torch.Tensor) -> torch.Tensor:
        """A forward hook: a row-parallel layer's partial sums become the full output on every rank."""
        return self.all_reduce(out)

    def all_gather_cols(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """[N, sizes[rank]] on each rank -> [N, sum(sizes)] in rank order (padded to the largest, as all_gather
        needs equal shapes, then trimmed)."""
        width = max(sizes)
        if x.shape[-1] < width:
            x = torch.cat([x, x.new_zeros(*x.shape[:-1], width - x.shape[-1])], dim=-1)
        x = x.contiguous()
        self.stats.count("all_gather", x.numel() * x.element_size())
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x)
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)

    def broadcast(self, obj=None):
        """Rank 0's object on every rank (pickled; tensors inside travel with it)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's object, on rank 0 (None elsewhere)."""
        out = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
