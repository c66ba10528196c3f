"""Token data for the transformer: token splits, teacher forcing, the images
each variant trains on, and batched prediction.

The tokenize stage stores every split as multi-scale code indices; here they
become (label, teacher-forcing input, target) batches without the encoder.
Training, the reference tables and evaluation all read their data through
this module, so they agree on which images are held out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from up.core.errors import StageError
from up.data.splits import load_token_arrays, token_path
from up.models.tokenizer import MultiScaleVQVAE, split_indices

# A split's teacher-forcing inputs are computed once and kept in memory when
# they take at most this many bytes (4,000 MNIST images: 66 MB); larger
# datasets (ImageNet: ~110 GB) rebuild them per batch on the device.
CACHE_BYTES = 2**30


class TeacherForcing:
    """Teacher-forcing inputs (B, L - p_1^2, C) of a token split, built by the
    frozen tokenizer from the indices alone: the encoder never runs here."""

    def __init__(self, tokenizer: MultiScaleVQVAE, indices: torch.Tensor, device: torch.device,
                 cache_bytes: int = CACHE_BYTES, chunk: int = 1024):
        self.tokenizer, self.indices, self.device, self.chunk = tokenizer, indices, device, chunk
        n, length = indices.shape
        size = n * (length - tokenizer.patch_nums[0] ** 2) * tokenizer.latent_channels * 4
        self.cache = self._build(torch.arange(n)) if size <= cache_bytes else None

    @torch.no_grad()
    def _build(self, ids: torch.Tensor) -> torch.Tensor:
        parts = []
        for chunk in ids.split(self.chunk):
            maps = split_indices(self.indices[chunk].to(self.device), self.tokenizer.patch_nums)
            parts.append(self.tokenizer.indices_to_var_input(maps))
        return torch.cat(parts)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            return self._build(ids)
        return self.cache[ids.to(self.cache.device)]


@dataclass
class TokenSplit:
    indices: torch.Tensor  # (N, L), the cache's small integer dtype
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    inputs: TeacherForcing

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, ids: torch.Tensor, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels, teacher-forcing input, target indices) of the items ``ids``."""
        return (self.labels[ids].to(device), self.inputs(ids),
                self.indices[ids].long().to(device))


def load_token_split(root: str | Path, name: str, tokenizer: MultiScaleVQVAE,
                     device: torch.device, cache_bytes: int = CACHE_BYTES) -> TokenSplit:
    """Split ``name`` of the token cache in ``root``: indices memory-mapped (every DDP
    rank reads the same pages), checked against the tokenizer's scales."""
    saved = load_token_arrays(root, name)
    if saved.patch_nums != list(tokenizer.patch_nums):
        raise StageError(f"{token_path(root, name)} was tokenized with patch_nums "
                         f"{saved.patch_nums}, the tokenizer has {list(tokenizer.patch_nums)}: "
                         "rerun the tokenize stage")
    inputs = TeacherForcing(tokenizer, saved.indices, device, cache_bytes)
    return TokenSplit(saved.indices, saved.labels.long(), saved.classes, inputs)


def fixed_subset(n: int, k: int) -> torch.Tensor:
    """k of n items drawn once with a fixed seed (the same for every run and
    variant), in order. Splits are often sorted by class: a prefix is not a sample."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return perm[:k].sort().values


def training_ids(labels: torch.Tensor, calib_fraction: float, images_per_class: int, seed: int,
                 train_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit ids, calibration ids) of a training split, sorted.

    The calibration slice (a ``calib_fraction`` of the images drawn by the
    pipeline ``seed``) is held out of training for every variant and training
    seed alike: the calibrated and teacher references and post-hoc temperature
    scaling fit their temperatures on it, the empirical reference picks its
    context and prior on it. With ``images_per_class`` > 0 only n images of
    each class are trained on (the small-data regime where cross-entropy
    over-fits), drawn from the rest by the training seed ``train_seed``, so
    that repeated trainings measure the variance of the data as well as of the
    initialisation. With 0 every image outside the slice is trained on and
    ``train_seed`` plays no part.
    """
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held = round(calib_fraction * len(labels))
    calib, fit = perm[:held], perm[held:]
    if images_per_class > 0:
        fit = fit[torch.randperm(len(fit), generator=torch.Generator().manual_seed(train_seed))]
        fit_labels = labels[fit]
        rank = torch.zeros_like(fit)
        for c in fit_labels.unique():
            mask = fit_labels == c
            rank[mask] = torch.arange(int(mask.sum()))
        fit = fit[rank < images_per_class]
    return fit.sort().values, calib.sort().values
