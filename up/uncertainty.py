"""Per-token uncertainty at generation time (METHOD §4).

Each generated token is drawn from a distribution p over the V codes; three
numbers describe how uncertain that draw was: the entropy H(p), the total
second-order dispersion sum_k Var[theta_k] of the Dirichlet read of p, and
the semantic entropy over codebook clusters. Maps keep them per position;
aggregates rank whole images (selective generation).
"""

from __future__ import annotations

import torch

from up.losses import dirichlet_variance, semantic_entropy

MEASURES = ("entropy", "dispersion", "semantic_entropy")


def token_uncertainty(logits: torch.Tensor, code_to_cluster: torch.Tensor, num_clusters: int,
                      kappa: float = 1.0) -> dict[str, torch.Tensor]:
    """The three measures of the distributions softmax(logits) (..., V) -> (...) each.

    ``logits`` must be those of the distribution actually sampled from (after
    guidance and temperature, before top-k/top-p truncation).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    probs = logp.exp()
    return dict(
        entropy=-(probs * logp).sum(-1),
        dispersion=dirichlet_variance(probs, kappa).sum(-1),
        semantic_entropy=semantic_entropy(probs, code_to_cluster, num_clusters),
    )


def aggregate(maps: dict[str, list[torch.Tensor]]) -> tuple[dict, dict]:
    """Per-image summaries of per-scale maps {measure: [(N, p_k, p_k)] * K}.

    Returns (image, per_scale): image[m] (N,) is the mean over all L tokens
    (each token counts once, so fine scales dominate, as they do the image);
    per_scale[m] (N, K) is the mean within each scale.
    """
    image, per_scale = {}, {}
    for name, scales in maps.items():
        flat = [s.flatten(1) for s in scales]
        per_scale[name] = torch.stack([f.mean(1) for f in flat], dim=1)
        image[name] = torch.cat(flat, dim=1).mean(1)
    return image, per_scale
