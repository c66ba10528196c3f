"""Process groups under torchrun: the rank context every multi-process stage shares.

A plain process (WORLD_SIZE unset or 1) gets ``Dist()`` and never touches
torch.distributed, so single-process runs need no launcher.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextmanager
def distributed(device_type: str) -> Iterator[Dist]:
    """A process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)
    when WORLD_SIZE > 1: nccl on GPUs, gloo on CPUs. A plain process gets Dist()."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Dist()
        return
    ctx = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    try:
        yield ctx
    finally:
        dist.destroy_process_group()


def reseed_rank(seed: int, step: int, rank: int) -> None:
    """Give each rank its own random stream (drop-path masks) from (seed, step, rank)."""
    torch.manual_seed(seed * 1_000_003 + step * 1_009 + rank)


def all_reduce_sum(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` summed over every process (moved to ``device`` for nccl), on the CPU."""
    summed = tensor.to(device)
    dist.all_reduce(summed)
    return summed.cpu()


def rank_device(device: torch.device, ctx: Dist) -> torch.device:
    """This process's device: its own GPU (LOCAL_RANK) under torchrun on CUDA."""
    return torch.device("cuda", ctx.local_rank) if device.type == "cuda" else device
