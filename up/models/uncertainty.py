"""Measures of a predictive distribution that training and sampling share.

The first-order view (entropy) and the second-order one: a prediction p read
as the mean of Dir(kappa * p), whose per-code variance is the dispersion the
uncertainty-preserving loss keeps from collapsing (docs/method.md), and the
entropy over clusters of codes that share a meaning (semantic entropy).
Shapes: probs (..., V); every measure reduces the last axis.
"""

from __future__ import annotations

import torch


def dirichlet_variance(probs: torch.Tensor, kappa: float | torch.Tensor) -> torch.Tensor:
    """Per-coordinate variance of Dir(kappa * p): p (1 - p) / (kappa + 1).
    ``kappa`` is a number or one evidence mass per distribution (probs.shape[:-1])."""
    if torch.is_tensor(kappa):
        kappa = kappa.unsqueeze(-1)
    return probs * (1.0 - probs) / (kappa + 1.0)


def cluster_probs(probs: torch.Tensor, code_to_cluster: torch.Tensor,
                  num_clusters: int) -> torch.Tensor:
    """P(c) = sum of p_k over the codes k of cluster c: (..., V) -> (..., num_clusters)."""
    out = probs.new_zeros(*probs.shape[:-1], num_clusters)
    return out.scatter_add(-1, code_to_cluster.expand_as(probs), probs)


def safe_log(cluster_p: torch.Tensor) -> torch.Tensor:
    """log P with 0 log 0 = 0: flooring at the dtype's smallest normal keeps the
    value exact and the gradient finite where a cluster's mass underflowed."""
    return cluster_p.clamp_min(torch.finfo(cluster_p.dtype).tiny).log()


def semantic_entropy(probs: torch.Tensor, code_to_cluster: torch.Tensor,
                     num_clusters: int) -> torch.Tensor:
    """Entropy of the prediction over clusters of codes that share a meaning."""
    cluster_p = cluster_probs(probs, code_to_cluster, num_clusters)
    return -(cluster_p * safe_log(cluster_p)).sum(-1)
