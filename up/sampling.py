"""Scale-by-scale generation with classifier-free guidance and uncertainty capture.

VAR's autoregressive inference: at scale k the transformer predicts logits
for all p_k^2 positions at once; the guided, tempered distribution is
recorded (entropy, dispersion, semantic entropy) and then truncated by
top-k/top-p and sampled; the conditional half of the same forward gives the
model's own prediction, whose entropy and the sampled token's surprisal are
recorded too (no extra forward); the tokenizer accumulates the sampled map into
f_hat and builds the next scale's input; the decoder turns the final f_hat
into images. The KV cache makes each step cost only the new scale's tokens.
"""

from __future__ import annotations

import torch

from up.tokenizer import to_uint8
from up.uncertainty import ALL_MEASURES, aggregate, conditional_uncertainty, token_uncertainty


def guidance_ratio(guidance: float, schedule: str, k: int, num_scales: int) -> float:
    """Guidance strength t at scale k (0-based): ``linear`` grows from 0 at the
    first scale to ``guidance`` at the last (VAR: coarse layout free, details guided)."""
    if schedule == "constant":
        return guidance
    if schedule == "linear":
        return guidance * k / max(num_scales - 1, 1)
    raise ValueError(f"unknown guidance_schedule {schedule!r} (linear | constant)")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask to -inf the codes outside the top-k (0 = off) and outside the
    smallest set of probability mass >= top_p (1 = off); VAR's rule, so the
    most likely code always survives."""
    logits = logits.clone()
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1.0 - top_p
        drop[..., -1] = False
        logits.masked_fill_(drop.scatter(-1, order, drop), -torch.inf)
    return logits


def sample_tokens(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of softmax(logits) (..., V) -> (...)."""
    probs = logits.softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


@torch.no_grad()
def sample(var, tokenizer, labels: torch.Tensor, *, guidance: float,
           guidance_schedule: str, top_k: int = 0, top_p: float = 1.0,
           temperature: float = 1.0, scale_temperatures: torch.Tensor | None = None,
           generator: torch.Generator,
           code_to_cluster: torch.Tensor, num_clusters: int, kappa: float = 1.0,
           use_cache: bool = True) -> tuple[torch.Tensor, list[torch.Tensor], dict]:
    """Generate one image per label (-1 = unconditional).

    Guidance doubles the batch with the null class and samples from
    (1 + t) * cond - t * uncond (VAR's formula) divided by the temperature
    (times the scale's temperature in ``scale_temperatures``, post-hoc
    temperature scaling: dividing both branches by T_k divides their mix);
    with guidance = 0 (or no conditional label) the null branch is skipped. The
    sampled indices feed both halves, as in VAR.

    Also recorded: the conditional distribution's entropy and the sampled
    token's surprisal (``cond_entropy``, ``surprisal``), from the cond half of
    the logits divided by the scale's temperature only (the run's calibrated
    prediction; the sampling ``temperature`` and guidance are sampling choices).

    Returns (images uint8 (B, C, H, W), indices [(B, p_k, p_k)] * K,
    uncertainty dict(maps, image, per_scale) in the samples.pt format, one entry
    per measure of ``ALL_MEASURES``).
    ``generator`` lives on the model's device. ``use_cache=False`` re-runs the
    full forward on the growing prefix: it exists for the equivalence test and
    the benchmark.
    """
    device = var.scale_ids.device
    labels = labels.to(device)
    B, patch_nums = labels.shape[0], var.patch_nums
    null = var.num_classes
    cond_labels = torch.where(labels < 0, null, labels)
    guided = guidance > 0 and bool((labels >= 0).any())
    model_labels = torch.cat((cond_labels, torch.full_like(cond_labels, null))) if guided \
        else cond_labels
    code_to_cluster = code_to_cluster.to(device)

    side = tokenizer.latent_side
    f_hat = torch.zeros(B, tokenizer.latent_channels, side, side, device=device)
    x_k, prefix = None, []
    indices, maps = [], {m: [] for m in ALL_MEASURES}
    var.enable_kv_cache(use_cache)
    try:
        for k, pn in enumerate(patch_nums):
            if use_cache:
                logits = var.forward_scale(k, model_labels, x_k)
            else:
                var_input = torch.cat(prefix, dim=1) if prefix else f_hat.new_zeros(
                    len(model_labels), 0, tokenizer.latent_channels)
                begin, end = var.begin_ends[k]
                logits = var(model_labels, var_input)[:, begin:end]
            logits = logits.float()
            t_k = 1.0 if scale_temperatures is None else float(scale_temperatures[k])
            cond = logits[:B] / t_k
            if guided:
                t = guidance_ratio(guidance, guidance_schedule, k, len(patch_nums))
                logits = (1 + t) * logits[:B] - t * logits[B:]
            logits = logits / (temperature * t_k)
            for name, value in token_uncertainty(logits, code_to_cluster, num_clusters,
                                                 kappa).items():
                maps[name].append(value.view(B, pn, pn).cpu())
            idx = sample_tokens(filter_logits(logits, top_k, top_p), generator).view(B, pn, pn)
            for name, value in conditional_uncertainty(cond, idx).items():
                maps[name].append(value.view(B, pn, pn).cpu())
            indices.append(idx)
            f_hat, x_k = tokenizer.next_var_input(k, f_hat, idx)
            if x_k is not None:
                if guided:
                    x_k = torch.cat((x_k, x_k))
                prefix.append(x_k)
    finally:
        var.enable_kv_cache(False)
    images = to_uint8(tokenizer.fhat_to_image(f_hat)).cpu()
    image, per_scale = aggregate(maps)
    return images, [i.cpu() for i in indices], dict(maps=maps, image=image, per_scale=per_scale)
