"""Scale-by-scale generation with classifier-free guidance and uncertainty capture.

VAR's autoregressive inference: at scale k the transformer predicts logits
for all p_k^2 positions at once; the guided, tempered distribution is
recorded (entropy, dispersion, semantic entropy) and then truncated by
top-k/top-p and sampled (a temperature-scaled run records its calibrated
distribution and, unless it samples at its temperatures, draws from its base
model's: the same logits, divided by other temperatures); the conditional
half of the same forward gives the model's own prediction, whose entropy and
the sampled token's surprisal are recorded too (no extra forward); the
tokenizer accumulates the sampled map into f_hat and builds the next scale's
input; the decoder turns the final f_hat into images. The KV cache makes each
step cost only the new scale's tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from up.core.distributed import Dist
from up.core.runtime import autocast
from up.core.sharding import map_batches
from up.generation.scores import ALL_MEASURES, aggregate, conditional_uncertainty, token_uncertainty
from up.models.tokenizer import to_uint8
from up.models.transformer import compile_blocks


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
    most likely code always survives. Without truncation the logits are returned as they
    are (no copy); with it, a masked copy."""
    V = logits.shape[-1]
    if not (0 < top_k < V or top_p < 1.0):
        return logits
    logits = logits.clone()
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1.0 - top_p
        drop[..., -1] = False
        logits.masked_fill_(drop.scatter(-1, order, drop), -torch.inf)
    return logits


DRAWS = ("inverse_cdf", "multinomial")


def sample_tokens(logits: torch.Tensor, generator: torch.Generator,
                  draw: str = "inverse_cdf") -> torch.Tensor:
    """One draw per row of softmax(logits) (..., V) -> (...).

    ``inverse_cdf``: one uniform u per row, the first code whose running sum of
    probabilities exceeds u times the total (float64 sums, so no code's share is off by more
    than about 2^-52; a code of probability 0 is never drawn); ``multinomial``:
    torch.multinomial, which draws one exponential per code (V per token) and is the
    slowest step of CPU sampling after the matrix products; both are exact draws from the
    same distribution, but from the same seed they give different tokens."""
    probs = logits.softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    if draw == "multinomial":
        return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    if draw != "inverse_cdf":
        raise ValueError(f"unknown draw {draw!r} ({' | '.join(DRAWS)})")
    cdf = flat.double().cumsum_(-1)
    u = torch.rand(len(flat), 1, dtype=torch.float64, generator=generator, device=flat.device)
    index = torch.searchsorted(cdf, u.mul_(cdf[:, -1:]), right=True)
    return index.clamp_(max=flat.shape[-1] - 1).view(probs.shape[:-1])


def _divided(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """x / divisor, without the pass over x when the divisor is 1 (the same values)."""
    return x if divisor == 1.0 else x / divisor


def _branch_labels(labels: torch.Tensor, null: int, guidance: float
                   ) -> tuple[torch.Tensor, bool]:
    """(labels of the forward, guided): the conditional labels (null for -1), then
    the null class for the guidance branch, which is skipped when guidance is 0
    or no label is conditional."""
    cond = torch.where(labels < 0, null, labels)
    guided = guidance > 0 and bool((labels >= 0).any())
    return (torch.cat((cond, torch.full_like(cond, null))) if guided else cond), guided


def _scale_logits(var, k: int, labels: torch.Tensor, x_k: torch.Tensor | None,
                  prefix: list[torch.Tensor], use_cache: bool, channels: int) -> torch.Tensor:
    """float32 logits of scale k: one cached step, or (``use_cache=False``) the full
    forward over the growing prefix, for the equivalence test and the benchmark."""
    if use_cache:
        return var.forward_scale(k, labels, x_k).float()
    var_input = torch.cat(prefix, dim=1) if prefix else labels.new_zeros(
        len(labels), 0, channels, dtype=torch.float32)
    begin, end = var.begin_ends[k]
    return var(labels, var_input)[:, begin:end].float()


@torch.no_grad()
def sample(var, tokenizer, labels: torch.Tensor, *, guidance: float,
           guidance_schedule: str, top_k: int = 0, top_p: float = 1.0,
           temperature: float = 1.0, scale_temperatures: torch.Tensor | None = None,
           sample_at_temperatures: bool = False, generator: torch.Generator,
           code_to_cluster: torch.Tensor, num_clusters: int, kappa: float = 1.0,
           use_cache: bool = True, known: list[torch.Tensor] | None = None,
           draw: str = "inverse_cdf") -> tuple[torch.Tensor, list[torch.Tensor], dict]:
    """Generate one image per label (-1 = unconditional).

    Guidance doubles the batch with the null class and mixes
    (1 + t) * cond - t * uncond (VAR's formula); the sampled indices feed both
    halves, as in VAR. The mix divided by the sampling ``temperature`` times
    the scale's post-hoc temperature T_k (``scale_temperatures``: dividing
    both branches by T_k divides their mix) is the run's distribution, whose
    entropy, dispersion and semantic entropy are recorded. Tokens are drawn
    from the same mix divided by the sampling temperature times T_k when
    ``sample_at_temperatures``, else times 1: a calibrator (`ce+ts`) draws
    its base model's tokens, bitwise, and scores them with its temperatures.

    Also recorded: the conditional distribution's entropy and the sampled
    token's surprisal (``cond_entropy``, ``surprisal``), from the cond half of
    the logits divided by the scale's temperature only (the run's calibrated
    prediction; the sampling ``temperature`` and guidance are sampling choices).

    ``known`` (editing, up/generation/editing.py): per scale (B, p_k, p_k) tokens to
    force, -1 where the model samples. Every position is drawn as without it (the
    random stream is consumed alike), then the known positions are overwritten with
    the given tokens before they are scored, recorded and accumulated: all -1 is
    ``sample`` bitwise, no -1 decodes the given tokens (the tokenizer's reconstruction).

    Returns (images uint8 (B, C, H, W), indices [(B, p_k, p_k)] * K,
    uncertainty dict(maps, image, per_scale) over ``ALL_MEASURES``, the
    samples.pt format). ``generator`` lives on the model's device.
    """
    device = var.scale_ids.device
    labels = labels.to(device)
    B, patch_nums = labels.shape[0], var.patch_nums
    model_labels, guided = _branch_labels(labels, var.num_classes, guidance)
    code_to_cluster = code_to_cluster.to(device)

    side = tokenizer.latent_side
    f_hat = torch.zeros(B, tokenizer.latent_channels, side, side, device=device)
    x_k, prefix = None, []
    indices, maps = [], {m: [] for m in ALL_MEASURES}
    var.enable_kv_cache(use_cache)
    try:
        for k, pn in enumerate(patch_nums):
            logits = _scale_logits(var, k, model_labels, x_k, prefix, use_cache,
                                   tokenizer.latent_channels)
            t_k = 1.0 if scale_temperatures is None else float(scale_temperatures[k])
            t_draw = t_k if sample_at_temperatures else 1.0
            cond = _divided(logits[:B], t_k)
            if guided:
                t = guidance_ratio(guidance, guidance_schedule, k, len(patch_nums))
                logits = (1 + t) * logits[:B] - t * logits[B:]
            drawn = _divided(logits, temperature * t_draw)
            idx = sample_tokens(filter_logits(drawn, top_k, top_p), generator, draw).view(B, pn, pn)
            if known is not None:
                forced = known[k].to(device)
                idx = torch.where(forced >= 0, forced, idx)
            scored = _divided(logits, temperature * t_k)
            recorded = {**token_uncertainty(scored, code_to_cluster, num_clusters, kappa),
                        **conditional_uncertainty(cond, idx)}
            for name, value in recorded.items():
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


def compile_for_sampling(var: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """``var`` with its blocks compiled for ``sample.compile`` (:func:`compile_blocks`), or
    as it is. The first batch pays the compile (inductor's on-disk cache keeps it for the
    next process on the machine), so it pays off on long sampling, not on a few batches
    (bench/sampling.py --compile measures it)."""
    return compile_blocks(var, "sample.compile") if enabled else var


def batch_generator(seed: int, batch: int, device: torch.device | str) -> torch.Generator:
    """Batch b's own random stream, a pure function of (seed, b): whichever rank draws a
    batch draws the same tokens, so samples do not depend on the number of processes."""
    state = np.random.SeedSequence([seed, batch]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def batch_sampler(var, tokenizer, labels: torch.Tensor, seed: int, bf16: bool = False,
                  **kwargs) -> Callable[[int, torch.Tensor], tuple[torch.Tensor, dict]]:
    """``fn(b, ids)`` -> (images, uncertainty) of ``labels[ids]`` sampled from batch b's
    stream (``sample``'s keyword arguments in ``kwargs``; bf16 autocast on CUDA): the unit
    of work that ``map_batches`` shares among ranks."""
    device = var.scale_ids.device

    def run(batch: int, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with autocast(device, bf16):
            images, _, unc = sample(var, tokenizer, labels[ids],
                                    generator=batch_generator(seed, batch, device), **kwargs)
        return images, unc

    return run


def sample_many(var, tokenizer, labels: torch.Tensor, batch_size: int, seed: int,
                description: str, ctx: Dist = Dist(), bf16: bool = False, **kwargs) -> dict | None:
    """Sample ``labels`` in batches shared among ``ctx``'s ranks; rank 0 gets the
    concatenation (the samples.pt format), the other ranks None."""
    parts = map_batches(batch_sampler(var, tokenizer, labels, seed, bf16, **kwargs), len(labels),
                        batch_size, ctx, description,
                        info=lambda part: f"mean entropy {part[1]['image']['entropy'].mean():.3f}")
    if parts is None:
        return None
    maps = {name: [torch.cat(s) for s in zip(*(unc["maps"][name] for _, unc in parts), strict=True)]
            for name in ALL_MEASURES}
    image, per_scale = aggregate(maps)
    return dict(images=torch.cat([images for images, _ in parts]), labels=labels.cpu(),
                uncertainty=dict(maps=maps, image=image, per_scale=per_scale))
