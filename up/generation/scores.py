"""Per-token uncertainty at generation time (docs/method.md §4).

Each generated token is drawn from a distribution p over the V codes; three
numbers describe how uncertain that draw was: the entropy H(p), the total
second-order dispersion sum_k Var[theta_k] of the Dirichlet read of p, and
the semantic entropy over codebook clusters. p is the guided, tempered
distribution, an extrapolation of the model; two more numbers come from the
model's own conditional prediction p_cond (the cond half of guidance, divided
by the run's post-hoc scale temperature, not by the sampling temperature):
its entropy and the surprisal -log p_cond(token) of the token actually drawn.
Maps keep them per position; aggregates rank whole images (selective
generation).
"""

from __future__ import annotations

import torch

from up.models.uncertainty import dirichlet_variance, semantic_entropy

MEASURES = ("entropy", "dispersion", "semantic_entropy")  # of the guided distribution
COND_MEASURES = ("cond_entropy", "surprisal")  # of the conditional (unguided) distribution
ALL_MEASURES = MEASURES + COND_MEASURES
# The scale groups of the per-image scores (scale_groups): the coarse half, the fine rest.
GROUPS = ("coarse", "fine")
# What selective generation ranks images by (image_scores): every measure as the mean
# over all tokens, and over each scale group (_coarse, _fine).
IMAGE_SCORES = [*ALL_MEASURES, *(f"{m}_{g}" for g in GROUPS for m in ALL_MEASURES)]


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


def conditional_uncertainty(cond_logits: torch.Tensor, tokens: torch.Tensor
                            ) -> dict[str, torch.Tensor]:
    """Entropy of softmax(cond_logits) (..., V) -> (...) and the surprisal
    -log p_cond(token) of the sampled ``tokens`` (...)."""
    logp = torch.log_softmax(cond_logits.float(), dim=-1)
    return dict(
        cond_entropy=-(logp.exp() * logp).sum(-1),
        surprisal=-logp.gather(-1, tokens.reshape(logp.shape[:-1]).unsqueeze(-1)).squeeze(-1),
    )


def scale_groups(n_scales: int) -> dict[str, range]:
    """The scales (0-based) of each group: 'coarse' the first floor(K / 2), 'fine' the
    rest, so a group of 3 scales is (0,) and (1, 2), of 6 scales (0, 1, 2) and (3, 4, 5).
    The coarse scales fix the layout and the fine ones the detail; with the fine scales
    holding most tokens, the all-token mean alone would hide what the coarse ones say."""
    if n_scales < 2:
        raise ValueError(f"scale groups need at least 2 scales, got {n_scales}")
    half = n_scales // 2
    return {"coarse": range(half), "fine": range(half, n_scales)}


def group_mean(scales: list[torch.Tensor], group: range) -> torch.Tensor:
    """Per-image mean over the tokens of the scales in ``group`` (each token once) of one
    measure's per-scale maps [(N, p_k, p_k)] * K -> (N,)."""
    return torch.cat([scales[k].flatten(1) for k in group], dim=1).mean(1)


def image_scores(maps: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The per-image scores selective generation ranks by, in IMAGE_SCORES' order: for
    every measure ``m`` in ``maps``, ``m`` (mean over all tokens), then ``m_coarse`` and
    ``m_fine`` (mean over the tokens of each scale group, ``scale_groups``)."""
    image, _ = aggregate(maps)
    groups = {name: scale_groups(len(scales)) for name, scales in maps.items()}
    return {**image, **{f"{name}_{g}": group_mean(scales, groups[name][g])
                        for g in GROUPS for name, scales in maps.items()}}


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
