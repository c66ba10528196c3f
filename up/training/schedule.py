"""Learning-rate schedule and a data order that is a pure function of the step.

Deriving each batch from (seed, step) instead of an iterator's hidden state is
what makes an interrupted run, resumed from a checkpoint, identical to an
uninterrupted one.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total: int, warmup: int, kind: str = "cosine",
              min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR at ``step``: linear warmup, then cosine or linear decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {kind!r}; allowed: cosine, linear")
    return min_ratio + (1.0 - min_ratio) * decay


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class StepBatches:
    """Batch indices for step ``s``: epoch-wise seeded permutations of ``n`` items.

    ``rank``/``world`` shard each global batch for DDP: the union of the ranks'
    shards is exactly the single-process batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n < batch_size:
            raise ValueError(f"dataset of {n} items is smaller than batch_size={batch_size}")
        if batch_size % world:
            raise ValueError(f"batch_size={batch_size} is not divisible by {world} processes")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world = rank, world
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=gen), epoch
        batch = self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]
        shard = self.batch_size // self.world
        return batch[self.rank * shard:(self.rank + 1) * shard]
