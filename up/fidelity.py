"""Quality metrics through torch-fidelity: FID, KID, IS, precision and recall.

Two feature networks: the project's evaluator (offline, registered as a
torch-fidelity feature extractor) and torch-fidelity's own
``inception-v3-compat`` (the standard for natural RGB images; weights from a
local path or downloaded). Settings that torch-fidelity would otherwise pick
silently are fixed here: the extractor is always named (precision/recall
default to VGG16, which it tries to download), the disk cache is off (it keys
on names, not weights), and KID's subset size and IS's split count never
exceed the sample count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torch_fidelity import calculate_metrics
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from up.evaluator import load_evaluator

EVALUATOR_EXTRACTOR = "up-evaluator"
INCEPTION_EXTRACTOR = "inception-v3-compat"


class EvaluatorFeatureExtractor(FeatureExtractorBase):
    """The project's evaluator as a torch-fidelity extractor: 'features' (FID, KID,
    precision/recall) and 'logits' (IS: torch-fidelity applies the softmax itself)."""

    def __init__(self, name: str, features_list: list[str],
                 feature_extractor_weights_path: str | None = None, **kwargs: Any):
        super().__init__(name, features_list)
        vassert(feature_extractor_weights_path is not None,
                f"{name} needs feature_extractor_weights_path (a models/evaluator.pt file)")
        self.net = load_evaluator(feature_extractor_weights_path)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vassert(x.dtype == torch.uint8 and x.dim() == 4, "expecting uint8 images (B, C, H, W)")
        features, logits = self.net(x)
        out = {"features": features, "logits": logits}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False


def register_evaluator() -> None:
    """Register the evaluator extractor once per process (a second registration raises)."""
    if EVALUATOR_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EVALUATOR_EXTRACTOR, EvaluatorFeatureExtractor)


class UInt8Images(Dataset):
    """Bare uint8 (C, H, W) tensors, the input torch-fidelity expects; grayscale is
    repeated to 3 channels for Inception, which accepts RGB only."""

    def __init__(self, images: torch.Tensor, rgb: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
        self.images, self.rgb = images, rgb

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.images[i]
        return image.expand(3, -1, -1) if self.rgb and image.shape[0] == 1 else image


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
    pr_neighborhood: int = 3
    seed: int = 0

    @property
    def extractor_name(self) -> str:
        if self.extractor == "evaluator":
            return EVALUATOR_EXTRACTOR
        if self.extractor == INCEPTION_EXTRACTOR:
            return INCEPTION_EXTRACTOR
        raise ValueError(f"unknown feature extractor {self.extractor!r}; allowed: evaluator, "
                         f"{INCEPTION_EXTRACTOR}")

    def kwargs(self, n_gen: int, n_real: int) -> dict[str, Any]:
        """calculate_metrics keyword arguments (also handed to the extractor's constructor)."""
        if self.extractor == "evaluator":
            if self.weights_path is None:
                raise ValueError("the evaluator extractor needs weights_path (models/evaluator.pt)")
            register_evaluator()
        if self.weights_path is not None and not Path(self.weights_path).is_file():
            raise FileNotFoundError(f"{self.extractor} weights not found: {self.weights_path}")
        return dict(
            feature_extractor=self.extractor_name,
            feature_extractor_weights_path=self.weights_path,
            cuda=self.cuda,
            batch_size=self.batch_size,
            kid_subset_size=min(self.kid_subset_size, n_gen, n_real),
            kid_subsets=self.kid_subsets,
            isc_splits=min(10, n_gen),
            prc_neighborhood=self.pr_neighborhood,
            rng_seed=self.seed,
            cache=False,
            save_cpu_ram=True,
            verbose=False,
        )

    def dataset(self, images: torch.Tensor) -> UInt8Images:
        return UInt8Images(images, rgb=self.extractor == INCEPTION_EXTRACTOR)


def compute_quality(gen: torch.Tensor, real: torch.Tensor, config: FidelityConfig) -> dict[str, float]:
    """FID, KID, IS, precision and recall of uint8 generated images against real ones."""
    smallest = min(len(gen), len(real))
    if smallest <= config.pr_neighborhood:
        raise ValueError(f"precision/recall with {config.pr_neighborhood} neighbours needs more "
                         f"images per set (got {len(gen)} generated, {len(real)} real)")
    out = calculate_metrics(input1=config.dataset(gen), input2=config.dataset(real),
                            isc=True, fid=True, kid=True, prc=True, **config.kwargs(len(gen), len(real)))
    return {
        "fid": out["frechet_inception_distance"],
        "kid_mean": out["kernel_inception_distance_mean"],
        "kid_std": out["kernel_inception_distance_std"],
        "is_mean": out["inception_score_mean"],
        "is_std": out["inception_score_std"],
        "precision": out["precision"],
        "recall": out["recall"],
    }


def extract_features(images: torch.Tensor, config: FidelityConfig) -> torch.Tensor:
    """The features FID and precision/recall use, computed once per image set so that
    many subsets (selective generation) can be scored without re-running the network."""
    kwargs = config.kwargs(len(images), len(images))
    extractor = create_feature_extractor(kwargs["feature_extractor"], [_fid_layer(config)], **kwargs)
    features = get_featuresdict_from_dataset(config.dataset(images), extractor, config.batch_size,
                                             config.cuda, True, False)
    return features[_fid_layer(config)]


def _fid_layer(config: FidelityConfig) -> str:
    return "features" if config.extractor == "evaluator" else "2048"


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """FID between two feature sets: torch-fidelity's quantity, computed through symmetric
    decompositions. With A, B the centred features / sqrt(n - 1), tr sqrt(S1 S2) is the sum
    of the singular values of A B^T (an n1 x n2 matrix, cheap when there are fewer images
    than dimensions), else tr sqrt(S1^1/2 S2 S1^1/2). torch-fidelity takes the general
    eigenvalues of the d x d product instead, which costs tens of seconds at d = 2048 on a
    CPU; selective generation needs dozens of FIDs."""
    x, y = x.double(), y.double()
    a = (x - x.mean(0)) / math.sqrt(len(x) - 1)
    b = (y - y.mean(0)) / math.sqrt(len(y) - 1)
    diff = x.mean(0) - y.mean(0)
    if x.shape[1] <= min(len(x), len(y)):
        w, v = torch.linalg.eigh(a.T @ a)
        root = (v * w.clamp_min(0).sqrt()) @ v.T
        tr_covmean = torch.linalg.eigvalsh(root @ (b.T @ b) @ root).clamp_min(0).sqrt().sum()
    else:
        tr_covmean = torch.linalg.svdvals(a @ b.T).sum()
    return float(diff @ diff + a.square().sum() + b.square().sum() - 2 * tr_covmean)


class SubsetQuality:
    """FID, precision and recall of generated-image subsets against fixed real features
    (precision/recall with torch-fidelity's own function)."""

    def __init__(self, real_features: torch.Tensor, config: FidelityConfig):
        self.real_features, self.config = real_features, config

    def __call__(self, gen_features: torch.Tensor) -> dict[str, float]:
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
                          kid_subset_size=ev.kid_subset_size, kid_subsets=ev.kid_subsets,
                          pr_neighborhood=ev.pr_neighborhood, seed=seed)
