"""Quality metrics through torch-fidelity: FID, KID, IS, precision and recall.

Two feature networks: the project's evaluator (offline, registered as a
torch-fidelity feature extractor: up/evaluation/extractor.py) and torch-fidelity's own
``inception-v3-compat`` (the standard for natural RGB images; weights from a
local path or downloaded). Settings that torch-fidelity would otherwise pick
silently are fixed here: the extractor is always named (precision/recall
default to VGG16, which it tries to download), the disk cache is off (it keys
on names, not weights), and KID's subset size and IS's split count never
exceed the sample count.

Features are computed batch by batch (``FidelityFeatures``, ``ImageFeatures``)
and the metrics from the features, with torch-fidelity's own functions: image
sets are read through ``images[ids]`` (memory-mapped splits) and torchrun
ranks share the batches (``image_features``). FID is also available against
published statistics of a reference batch (``load_reference_stats``).

torch-fidelity is imported inside the functions that run it: the report reads this
module's metric declarations (METRICS) without loading it.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from up.core.distributed import Dist
from up.core.errors import StageError
from up.core.sharding import cat_dicts, map_batches
from up.evaluation.evaluator import evaluator_config, evaluator_outputs, load_evaluator
from up.evaluation.metrics import Metric

INCEPTION_EXTRACTOR = "inception-v3-compat"

# FID, KID, IS, precision and recall: quality_from_features and SubsetQuality; the spreads
# of KID over subsets and of IS over splits are kept in results/summary.json only.
METRICS = (
    Metric("fid", "FID", "lower", main=True, paired=True, headline=True, curve=True),
    Metric("kid_mean", "KID", "lower", main=True, headline=True),
    Metric("is_mean", "IS", "higher", main=True, headline=True),
    Metric("precision", "precision", "higher", main=True, paired=True, headline=True, curve=True),
    Metric("recall", "recall", "higher", main=True, paired=True, headline=True, curve=True),
    Metric("kid_std", "KID std", summary=True),
    Metric("is_std", "IS std", summary=True),
)


@dataclass(frozen=True)
class FidelityConfig:
    """Which feature network and how torch-fidelity runs it (``config_from_params``
    builds it from params.yaml's evaluate section)."""

    extractor: str = "evaluator"  # evaluator | inception-v3-compat
    weights_path: str | None = None  # evaluator checkpoint, or local Inception state dict
    cuda: bool = False
    batch_size: int = 256
    kid_subset_size: int = 200
    kid_subsets: int = 50
    is_splits: int = 10
    pr_neighborhood: int = 3
    seed: int = 0

    @property
    def extractor_name(self) -> str:
        from up.evaluation.extractor import EVALUATOR_EXTRACTOR

        if self.extractor == "evaluator":
            return EVALUATOR_EXTRACTOR
        if self.extractor == INCEPTION_EXTRACTOR:
            return INCEPTION_EXTRACTOR
        raise ValueError(f"unknown feature extractor {self.extractor!r}; allowed: evaluator, "
                         f"{INCEPTION_EXTRACTOR}")

    @property
    def layers(self) -> tuple[str, str]:
        """The extractor's (FID, KID and precision/recall layer, IS layer): torch-fidelity's
        defaults for each metric."""
        return ("features", "logits") if self.extractor == "evaluator" else ("2048", "logits_unbiased")

    def extractor_kwargs(self) -> dict[str, Any]:
        """torch-fidelity's keyword arguments that choose and place the feature network."""
        if self.extractor == "evaluator":
            if self.weights_path is None:
                raise ValueError("the evaluator extractor needs weights_path (models/evaluator.pt)")
            from up.evaluation.extractor import register_evaluator

            register_evaluator()
        if self.weights_path is not None and not Path(self.weights_path).is_file():
            raise FileNotFoundError(f"{self.extractor} weights not found: {self.weights_path}")
        return dict(feature_extractor=self.extractor_name,
                    feature_extractor_weights_path=self.weights_path, cuda=self.cuda,
                    verbose=False)

    def kwargs(self, n_gen: int, n_real: int) -> dict[str, Any]:
        """torch-fidelity's keyword arguments for metrics of n_gen against n_real images."""
        return dict(
            **self.extractor_kwargs(),
            batch_size=self.batch_size,
            kid_subset_size=min(self.kid_subset_size, n_gen, n_real),
            kid_subsets=self.kid_subsets,
            isc_splits=min(self.is_splits, n_gen),
            prc_neighborhood=self.pr_neighborhood,
            rng_seed=self.seed,
            cache=False,
            save_cpu_ram=True,
        )


class FidelityFeatures:
    """The config's feature network, loaded once: a uint8 batch (N, C, H, W) -> its
    'fid' layer (FID, KID, precision/recall) and 'isc' layer (IS) on the CPU. Batch by
    batch, so no image set has to be in memory at once; grayscale goes to Inception
    repeated to RGB, the only input it takes."""

    def __init__(self, config: FidelityConfig):
        from torch_fidelity.utils import create_feature_extractor

        self.config = config
        kwargs = config.extractor_kwargs()
        self.net = create_feature_extractor(kwargs.pop("feature_extractor"), list(config.layers),
                                            **kwargs)

    @property
    def dim(self) -> int:
        """Width of the 'fid' layer."""
        if self.config.extractor == "evaluator":
            return evaluator_config(self.net.net)["feature_dim"]
        return 2048

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 (N, C, H, W) images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        x = images.to("cuda" if self.config.cuda else "cpu")
        if self.config.extractor == INCEPTION_EXTRACTOR and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1).contiguous()
        out = self.net.convert_features_tuple_to_dict(self.net(x))
        fid, isc = self.config.layers
        return {"fid": out[fid].cpu(), "isc": out[isc].cpu()}


class ImageFeatures:
    """All that evaluation reads from an image, in one pass per batch: the evaluator's
    'features' and 'logits' (diversity, realism, class accuracy) and the fidelity
    network's 'fid' and 'isc' layers."""

    def __init__(self, config: FidelityConfig, evaluator_path: str | Path, device: torch.device):
        self.evaluator = load_evaluator(evaluator_path).to(device)
        self.fidelity, self.device = FidelityFeatures(config), device

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features, logits = evaluator_outputs(self.evaluator, images, len(images), self.device)
        return {"features": features, "logits": logits, **self.fidelity(images)}


def image_features(images, net: Callable[[torch.Tensor], dict[str, torch.Tensor]], batch_size: int,
                   ctx: Dist, description: str) -> dict[str, torch.Tensor] | None:
    """``net(images[ids])`` over every batch of ``images`` (a tensor or a memory-mapped
    split), the batches shared among ``ctx``'s ranks: the concatenation on rank 0, None
    on the others. Fixed batches: the features do not depend on the number of ranks."""
    parts = map_batches(lambda _, ids: net(images[ids]), len(images), batch_size, ctx, description)
    return None if parts is None else cat_dicts(parts)


def extract_features(images: torch.Tensor, config: FidelityConfig) -> torch.Tensor:
    """The 'fid' features of an in-memory image set, in one process."""
    return image_features(images, FidelityFeatures(config), config.batch_size, Dist(),
                          "features")["fid"]


def quality_from_features(gen: dict[str, torch.Tensor], real: dict[str, torch.Tensor],
                          config: FidelityConfig) -> dict[str, float]:
    """FID, KID, IS, precision and recall from 'fid' / 'isc' features (``FidelityFeatures``)
    of generated and real images: torch-fidelity's metric functions and settings, FID
    through ``frechet_distance``."""
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    n_gen, n_real = len(gen["fid"]), len(real["fid"])
    if min(n_gen, n_real) <= config.pr_neighborhood:
        raise ValueError(f"precision/recall with {config.pr_neighborhood} neighbours needs more "
                         f"images per set (got {n_gen} generated, {n_real} real)")
    kwargs = config.kwargs(n_gen, n_real)
    kid = kid_features_to_metric(gen["fid"], real["fid"], **kwargs)
    isc = isc_featuresdict_to_metric(gen, "isc", **kwargs)
    return {
        **SubsetQuality(real["fid"], config)(gen["fid"]),
        "kid_mean": kid["kernel_inception_distance_mean"],
        "kid_std": kid["kernel_inception_distance_std"],
        "is_mean": isc["inception_score_mean"],
        "is_std": isc["inception_score_std"],
    }


def compute_quality(gen: torch.Tensor, real: torch.Tensor, config: FidelityConfig) -> dict[str, float]:
    """FID, KID, IS, precision and recall of in-memory uint8 generated images against real ones."""
    net = FidelityFeatures(config)
    gen_f, real_f = (image_features(x, net, config.batch_size, Dist(), "features")
                     for x in (gen, real))
    return quality_from_features(gen_f, real_f, config)


def _centred(x: torch.Tensor) -> torch.Tensor:
    """Centred float64 rows / sqrt(n - 1): A with A^T A the sample covariance."""
    x = x.double()
    return (x - x.mean(0)) / math.sqrt(len(x) - 1)


def _trace_sqrt_product(a: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """tr sqrt(A^T A sigma) through symmetric matrices: the eigenvalues of the n x n
    A sigma A^T when there are fewer rows than dimensions, else of the d x d
    sqrt(A^T A) sigma sqrt(A^T A) (the same non-zero eigenvalues)."""
    if len(a) < a.shape[1]:
        return torch.linalg.eigvalsh(a @ sigma @ a.T).clamp_min(0).sqrt().sum()
    w, v = torch.linalg.eigh(a.T @ a)
    root = (v * w.clamp_min(0).sqrt()) @ v.T
    return torch.linalg.eigvalsh(root @ sigma @ root).clamp_min(0).sqrt().sum()


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """FID between two feature sets: torch-fidelity's quantity, computed through symmetric
    decompositions. With A, B the centred features / sqrt(n - 1), tr sqrt(S1 S2) is the sum
    of the singular values of A B^T (an n1 x n2 matrix, cheap when there are fewer images
    than dimensions), else tr sqrt(S1^1/2 S2 S1^1/2). torch-fidelity takes the general
    eigenvalues of the d x d product instead, which costs tens of seconds at d = 2048 on a
    CPU; selective generation needs dozens of FIDs."""
    a, b = _centred(x), _centred(y)
    diff = x.double().mean(0) - y.double().mean(0)
    if x.shape[1] <= min(len(x), len(y)):
        tr_covmean = _trace_sqrt_product(a, b.T @ b)
    else:
        tr_covmean = torch.linalg.svdvals(a @ b.T).sum()
    return float(diff @ diff + a.square().sum() + b.square().sum() - 2 * tr_covmean)


def frechet_distance_to_stats(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> float:
    """FID of a feature set against published statistics (mean (d,), covariance (d, d))
    of a reference batch, whose images are not at hand."""
    a, sigma = _centred(x), sigma.double()
    diff = x.double().mean(0) - mu.double()
    return float(diff @ diff + a.square().sum() + sigma.trace() - 2 * _trace_sqrt_product(a, sigma))


def load_reference_stats(path: str | Path, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) of an .npz with arrays ``mu`` (dim,) and ``sigma`` (dim, dim), e.g. the
    2048-d Inception pool statistics published with a benchmark's reference batch
    (guided-diffusion's VIRTUAL_imagenet256_labeled.npz). Other arrays are ignored and never
    read: np.load opens an .npz lazily, so the ADM suite's images (``arr_0``, about 2 GB)
    stay on disk. Checked before any work, so a wrong file fails in seconds: missing,
    unreadable, or of another feature width."""
    where = f"evaluate.reference_stats {path}"
    if not Path(path).is_file():
        raise StageError(f"{where}: file not found")
    try:
        with np.load(path) as npz:
            mu, sigma = npz["mu"], npz["sigma"]
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise StageError(f"{where}: not an .npz with arrays mu and sigma ({exc})") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise StageError(f"{where}: mu {mu.shape} and sigma {sigma.shape} are not (d,) and (d, d)")
    if len(mu) != dim:
        raise StageError(f"{where} holds {len(mu)}-d statistics but the feature extractor gives "
                         f"{dim}-d features (evaluate.feature_extractor)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise StageError(f"{where}: mu or sigma has non-finite entries")
    return torch.from_numpy(mu).double(), torch.from_numpy(sigma).double()


class SubsetQuality:
    """FID, precision and recall of generated-image subsets against fixed real features
    (precision/recall with torch-fidelity's own function)."""

    def __init__(self, real_features: torch.Tensor, config: FidelityConfig):
        self.real_features, self.config = real_features, config

    def __call__(self, gen_features: torch.Tensor) -> dict[str, float]:
        from torch_fidelity.metric_prc import prc_features_to_metric

        prc = prc_features_to_metric(gen_features, self.real_features,
                                     prc_neighborhood=self.config.pr_neighborhood,
                                     save_cpu_ram=True, verbose=False)
        return {"fid": frechet_distance(gen_features, self.real_features),
                "precision": prc["precision"], "recall": prc["recall"]}


def config_from_params(ev, evaluator_path: str, cuda: bool, seed: int) -> FidelityConfig:
    """The FidelityConfig of an EvaluateParams section: the project's evaluator, or
    InceptionV3 from ``evaluate.inception_weights``."""
    weights = evaluator_path if ev.feature_extractor == "evaluator" else ev.inception_weights
    return FidelityConfig(extractor=ev.feature_extractor, weights_path=weights, cuda=cuda,
                          batch_size=ev.feature_batch_size, kid_subset_size=ev.kid_subset_size,
                          kid_subsets=ev.kid_subsets, is_splits=ev.is_splits,
                          pr_neighborhood=ev.pr_neighborhood, seed=seed)
