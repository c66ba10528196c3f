"""The project's evaluator as a torch-fidelity feature extractor.

Apart from up/evaluation/fidelity.py, which imports it only when a feature network is
built, so that the metric declarations there (and the report, which reads them) do not
need torch-fidelity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from up.evaluation.evaluator import load_evaluator

EVALUATOR_EXTRACTOR = "up-evaluator"


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
