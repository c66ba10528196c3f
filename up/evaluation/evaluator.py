"""The evaluator: a small CNN classifier whose features replace Inception offline.

FID, KID, precision/recall and diversity need a feature space in which images
of one class lie close together; IS and the class accuracy of samples need
class posteriors. A classifier trained on the dataset itself gives both and
runs without downloading anything. Its penultimate features are multiplied by
a constant, fitted on the train split, that sets their RMS magnitude to an
Inception-like value: KID's polynomial kernel (x.y / d + 1)^3 is not scale
invariant, and raw features of a small CNN gave meaningless KID values.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from up.core.errors import StageError
from up.core.io import load_torch, save_torch
from up.training.loop import StepLoop, check_finite
from up.training.schedule import StepBatches, lr_factor, set_lr


class Evaluator(nn.Module):
    """Conv blocks (3x3 conv, batch norm, ReLU, 2x2 max-pool) -> 4x4 average pool ->
    features -> logits. The pooled 4x4 grid keeps the coarse layout a digit or object
    class is recognised by, for any input size."""

    def __init__(self, in_channels: int, num_classes: int, widths: list[int], feature_dim: int):
        super().__init__()
        blocks, channels = [], in_channels
        for width in widths:
            blocks += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.body = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.project = nn.Linear(channels * 16, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_multiplier = 1.0  # set from the train split after training

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, C, H, W) -> (scaled features (B, feature_dim), logits (B, classes))."""
        raw = F.relu(self.project(self.body(images.float() / 127.5 - 1.0)))
        return raw * self.feature_multiplier, self.head(raw)


@torch.no_grad()
def _batch_outputs(model: Evaluator, images: torch.Tensor, batch_size: int,
                   device: torch.device | str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features, logits) on the CPU, batch by batch: a split is never one tensor."""
    model.eval()
    for start in range(0, len(images), batch_size):
        f, z = model(images[start:start + batch_size].to(device))
        yield f.float().cpu(), z.float().cpu()


def evaluator_outputs(model: Evaluator, images: torch.Tensor, batch_size: int,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits of a uint8 image set, computed in batches, returned on the CPU."""
    features, logits = zip(*_batch_outputs(model, images, batch_size, device), strict=True)
    return torch.cat(features), torch.cat(logits)


def feature_multiplier(model: Evaluator, images: torch.Tensor, target_rms: float, batch_size: int,
                       device: torch.device | str = "cpu") -> float:
    """The constant that gives the features of ``images`` an RMS entry of ``target_rms``."""
    saved, model.feature_multiplier = model.feature_multiplier, 1.0
    squares, count = 0.0, 0
    try:
        for raw, _ in _batch_outputs(model, images, batch_size, device):
            squares += float(raw.double().square().sum())
            count += raw.numel()
    finally:
        model.feature_multiplier = saved
    rms = (squares / count) ** 0.5
    if rms == 0.0:
        raise StageError("evaluator features are all zero on the train split (dead ReLUs): "
                         "lower evaluator.lr and rerun")
    return target_rms / rms


def train_evaluator(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                    widths: list[int], feature_dim: int, feature_scale: float, steps: int,
                    batch_size: int, lr: float, warmup_steps: int, eval_batch_size: int,
                    seed: int, device: torch.device | str = "cpu",
                    show_progress: bool = True) -> Evaluator:
    """Train on uint8 ``images`` with AdamW and a cosine schedule (a linear warm-up of
    ``warmup_steps``, at most a tenth of the steps); set the feature multiplier on
    batches of ``eval_batch_size``.

    The batch of step s is a pure function of (seed, s) (StepBatches), so the
    result depends only on the arguments and the thread count.
    """
    gen = torch.Generator().manual_seed(seed)
    model = Evaluator(images.shape[1], num_classes, list(widths), feature_dim)
    with torch.no_grad():  # a seeded init independent of the global RNG
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_uniform_(module.weight, a=5 ** 0.5, generator=gen)
                if module.bias is not None:
                    module.bias.zero_()
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    batches = StepBatches(len(images), min(batch_size, len(images)), seed)
    warmup = min(warmup_steps, steps // 10)
    loop = StepLoop("evaluator", steps, show=show_progress)
    for step in loop:
        set_lr(optimizer, lr * lr_factor(step, steps, warmup, "cosine"))
        index = batches(step)
        x, y = images[index].to(device), labels[index].to(device)
        _, logits = model(x)
        loss = F.cross_entropy(logits, y)
        check_finite({"loss": loss.item()}, step + 1, "the evaluator training",
                     "Lower evaluator.lr (or check the data) and rerun.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loop.info = f"loss {loss.item():.3f}"
    model.eval()
    model.feature_multiplier = feature_multiplier(model, images, feature_scale, eval_batch_size,
                                                  device)
    return model


def accuracy(model: Evaluator, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
             device: torch.device | str = "cpu") -> float:
    hits, start = 0, 0
    for _, logits in _batch_outputs(model, images, batch_size, device):
        hits += int((logits.argmax(1) == labels[start:start + len(logits)]).sum())
        start += len(logits)
    return hits / len(labels)


def evaluator_config(model: Evaluator) -> dict[str, Any]:
    convs = [m for m in model.body if isinstance(m, nn.Conv2d)]
    return {"in_channels": convs[0].in_channels, "num_classes": model.head.out_features,
            "widths": [c.out_channels for c in convs], "feature_dim": model.project.out_features}


def save_evaluator(model: Evaluator, path: str | Path, **extra: Any) -> None:
    save_torch({"config": evaluator_config(model), "state_dict": model.state_dict(),
                "feature_multiplier": model.feature_multiplier, **extra}, path)


def load_evaluator(path: str | Path) -> Evaluator:
    """The saved evaluator in eval mode, features scaled as at training time."""
    ckpt = load_torch(path, "evaluator checkpoint")
    model = Evaluator(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    model.feature_multiplier = float(ckpt["feature_multiplier"])
    return model.eval().requires_grad_(False)
