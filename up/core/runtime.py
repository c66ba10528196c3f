"""Process set-up shared by every stage: threads, seeds, device, progress bars."""

from __future__ import annotations

import platform
import random
from contextlib import nullcontext

import torch

from up.core.errors import StageError


def cpu_model() -> str:
    """The CPU's model name (quote times with it: machines differ 2-3x)."""
    try:
        for line in open("/proc/cpuinfo").read().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def setup(seed: int, threads: int) -> None:
    """Fix the thread count and every RNG: results are bitwise reproducible only
    at a fixed intra-op thread count on CPU."""
    torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise StageError("device=cuda requested but CUDA is not available (set device: cpu)")
    return torch.device(device)


def progress(**kwargs):
    """A rich progress bar with the columns every long loop of the project shows."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        **kwargs,
    )


def autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
