"""Batched work shared by torchrun ranks: batch b runs on rank b % world, rank 0 gathers.

The batches depend only on the item count and the batch size, and a batch's
result only on its own items (and, when it draws random numbers, on its
index: ``up.generation.sampler.batch_generator``), so a stage's outputs do not depend
on how many processes share the work. Results are gathered one round of
``world`` batches at a time: rank 0 receives them already in batch order,
and no rank ever holds more than one round of another rank's results.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from up.core.distributed import Dist
from up.core.runtime import progress

T = TypeVar("T")


def _gather(obj: T | None, ctx: Dist) -> list[T | None]:
    """Every rank's ``obj`` on rank 0, in rank order (an empty list elsewhere)."""
    if ctx.world == 1:
        return [obj]
    gathered = [None] * ctx.world if ctx.main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered if ctx.main else []


def map_batches(fn: Callable[[int, torch.Tensor], T], n: int, batch_size: int, ctx: Dist,
                description: str, info: Callable[[T], str] | None = None) -> list[T] | None:
    """``fn(b, ids)`` for every batch b of ``range(n)`` split into ``batch_size`` ids:
    the results in batch order on rank 0, None on the other ranks. ``info`` labels the
    progress bar (rank 0's) with the latest result."""
    batches = torch.arange(n).split(batch_size)
    results: list[T] = []
    with progress(disable=not ctx.main) as bar:
        task = bar.add_task(description, total=n, info="")
        for first in range(0, len(batches), ctx.world):
            mine = first + ctx.rank
            out = fn(mine, batches[mine]) if mine < len(batches) else None
            done = _gather(out, ctx)[:len(batches) - first]
            results += done
            if done:
                bar.update(task, advance=sum(len(b) for b in batches[first:first + len(done)]),
                           info=info(done[-1]) if info else "")
    return results if ctx.main else None


def cat_dicts(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-batch dicts of tensors -> one dict of tensors concatenated along dim 0."""
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
