"""Selective generation and diversity.

A useful uncertainty score ranks generated images so that dropping the most
uncertain ones improves quality more than dropping the same number at random.
The bookkeeping (which images survive at each kept fraction, the random-drop
control) is kept apart from the metric, which is passed in, so the ranking
direction and the kept counts can be checked on examples with a known answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Metric = Callable[[torch.Tensor], dict[str, float | None]]


def kept_count(n: int, fraction: float) -> int:
    """round(fraction * n), at least 1: the same count for every score and the control."""
    if not 0 < fraction <= 1:
        raise ValueError(f"kept fraction must be in (0, 1], got {fraction}")
    return max(1, min(n, round(fraction * n)))


def most_certain(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ``fraction`` of images with the lowest uncertainty score
    (ties: lower index first), most certain first."""
    order = torch.argsort(scores, stable=True)
    return order[:kept_count(len(scores), fraction)]


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)


def selective_curves(scores: dict[str, torch.Tensor], fractions: Sequence[float], metric: Metric,
                     random_repeats: int, seed: int) -> list[dict]:
    """One row per (score, kept fraction) with the metric on the kept images, plus
    'random' rows: the metric averaged over ``random_repeats`` seeded random subsets
    of the same size. Rows: score, fraction, kept, repeats, then the metric's keys."""
    sizes = {len(s) for s in scores.values()}
    if len(sizes) != 1:
        raise ValueError(f"scores disagree on the number of images: {sorted(sizes)}")
    n = sizes.pop()
    rows = []
    for name, values in scores.items():
        for fraction in fractions:
            kept = most_certain(values, fraction)
            rows.append({"score": name, "fraction": fraction, "kept": len(kept), "repeats": 1,
                         **metric(kept)})
    gen = torch.Generator().manual_seed(seed)
    for fraction in fractions:
        count = kept_count(n, fraction)
        draws = [metric(torch.randperm(n, generator=gen)[:count]) for _ in range(random_repeats)]
        rows.append({"score": "random", "fraction": fraction, "kept": count,
                     "repeats": random_repeats,
                     **{key: _mean([d[key] for d in draws]) for key in draws[0]}})
    return rows


def class_diversity(features: torch.Tensor, classes: torch.Tensor) -> float:
    """Mean pairwise Euclidean feature distance within each class, averaged over the
    classes with at least two images: low when a model collapses inside a class."""
    per_class = []
    for cls in torch.unique(classes).tolist():
        members = features[classes == cls].double()
        if len(members) >= 2:
            per_class.append(torch.pdist(members).mean().item())
    if not per_class:
        raise ValueError("diversity needs a class with at least two images")
    return sum(per_class) / len(per_class)


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Fraction of conditioned images (label >= 0) the evaluator assigns to their class;
    None when no image was conditioned."""
    conditioned = labels >= 0
    if not conditioned.any():
        return None
    return (logits[conditioned].argmax(1) == labels[conditioned]).double().mean().item()
