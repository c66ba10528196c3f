"""Per-scale temperatures: fitted once here, applied everywhere the same way.

One temperature T_s per scale divides that scale's logits (Guo et al. 2017's
post-hoc scaling, per scale since coarse and fine scales are over-confident
to different degrees). Four users share it: the calibrated reference of `up`
(refitted during training), the teacher of the derived variants, `ce+ts` /
`up+ts`, and evaluation and sampling, which read a run's fitted temperatures.
The fits use the calibration slice only (never val or test).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch

from up.core.distributed import Dist, all_reduce_sum
from up.core.runtime import autocast
from up.models.transformer import VAR


def inverse(temperatures: torch.Tensor, scale_ids: torch.Tensor,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """1 / T of each token position's scale, (L, 1): multiply (B, L, V) logits by it."""
    return temperatures.to(scale_ids.device, dtype).reciprocal()[scale_ids].unsqueeze(-1)


class TeacherForcedBatches(Protocol):
    """A token split: (labels, teacher-forcing inputs, targets) of the images ``ids``."""

    def batch(self, ids: torch.Tensor, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@torch.no_grad()
def predict(model: VAR, split: TeacherForcedBatches, ids: torch.Tensor, batch_size: int, bf16: bool,
            temperatures: torch.Tensor | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 logits (B, L, V), targets (B, L)) batch by batch, in eval mode
    with the true labels; ``temperatures`` (K,) divide each scale's logits
    (post-hoc temperature scaling)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    inv_temp = None if temperatures is None else inverse(temperatures, model.scale_ids)
    try:
        for chunk in ids.split(batch_size):
            labels, inputs, targets = split.batch(chunk, device)
            with autocast(device, bf16):
                logits = model(labels, inputs)
            logits = logits.float()
            yield (logits if inv_temp is None else logits * inv_temp), targets
    finally:
        model.train(was_training)



def _nll_slope_sums(logits: torch.Tensor, squares: torch.Tensor, target_logits: torch.Tensor,
                    beta: float, chunk: int = 4096) -> tuple[float, float]:
    """Sums over the tokens of the first and second derivative in beta of the NLL of
    softmax(beta z).

    The NLL is a log-partition minus a linear term in beta, so its
    derivatives are moments of q = softmax(beta z): E_q[z] - z_y and Var_q[z].
    """
    slope = curvature = 0.0
    for start in range(0, logits.shape[0], chunk):
        z = logits[start:start + chunk]
        q = torch.softmax(z * beta, 1)
        mean = torch.linalg.vecdot(q, z)
        slope += float((mean - target_logits[start:start + chunk]).sum())
        second = torch.linalg.vecdot(q, squares[start:start + chunk])
        curvature += float((second - mean.square()).sum())
    return slope, curvature


Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a float64 tensor over processes


@torch.no_grad()
def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, init: float = 1.0,
                    max_iter: int = 100, tol: float = 1e-7,
                    bounds: tuple[float, float] = (0.01, 100.0),
                    reduce: Reduce | None = None) -> float:
    """The T in ``bounds`` minimising the NLL of softmax(logits / T).

    Newton on beta = 1/T, safeguarded by bisection: the NLL is convex in beta,
    so the sign of its slope brackets the minimum, and a Newton step leaving
    the bracket is replaced by its geometric midpoint. Each iteration is one
    pass over the logits; from a warm start it converges in a few. An
    all-correct slice has no interior minimum (T -> 0): T stops at its bound.

    With ``reduce`` the tokens are spread over processes: each iteration sums
    the two derivatives and the token count over them (three numbers), so no
    logits move and every process takes the same steps to the same T.
    """
    logits = logits.double()  # float64 sums over many tokens; held for the whole fit
    squares = logits.square()
    target_logits = logits.gather(1, targets.unsqueeze(1)).squeeze(1)

    def slopes(beta: float) -> tuple[float, float]:
        sums = torch.tensor([*_nll_slope_sums(logits, squares, target_logits, beta),
                             float(logits.shape[0])], dtype=torch.float64)
        slope, curvature, count = (sums if reduce is None else reduce(sums)).tolist()
        if count == 0:
            raise ValueError("no tokens to fit a temperature on")
        return slope / count, curvature / count

    beta_min, beta_max = 1.0 / bounds[1], 1.0 / bounds[0]
    lo, hi = beta_min, beta_max  # bracket of the minimum
    beta = min(max(1.0 / init, beta_min), beta_max)
    for _ in range(max_iter):
        slope, curvature = slopes(beta)
        if slope > 0:
            hi = beta
        elif slope < 0:
            lo = beta
        step = beta - slope / curvature if curvature > 0 else math.nan
        if not abs(step - beta) <= tol * beta and not lo < step < hi:
            step = math.sqrt(lo * hi)
        done = abs(step - beta) <= tol * beta
        beta = min(max(step, beta_min), beta_max)
        if done:
            break
    return 1.0 / beta


class TemperatureCalibrator:
    """One temperature per scale, refitted on held-out tokens (Guo et al. 2017).

    Starts at T = 1. Each fit starts from the current temperatures; a scale
    without tokens in the slice keeps its value.
    """

    def __init__(self, num_scales: int):
        self.temperatures = torch.ones(num_scales, dtype=torch.float64)

    @torch.no_grad()
    def fit(self, logits: torch.Tensor, targets: torch.Tensor, scale_of_token: torch.Tensor,
            reduce: Reduce | None = None) -> torch.Tensor:
        """logits (N, V), targets (N,), scale_of_token (N,) -> temperatures (K,).

        ``reduce``: the tokens are spread over processes (see `fit_temperature`);
        a scale is fitted when any process holds tokens of it."""
        logits = logits.reshape(-1, logits.shape[-1])
        targets, scale_of_token = targets.reshape(-1), scale_of_token.reshape(-1)
        counts = torch.bincount(scale_of_token.cpu(), minlength=self.temperatures.numel()).double()
        counts = counts if reduce is None else reduce(counts)
        for s in range(self.temperatures.numel()):
            if counts[s] > 0:
                mask = scale_of_token == s
                self.temperatures[s] = fit_temperature(logits[mask], targets[mask],
                                                       init=float(self.temperatures[s]),
                                                       reduce=reduce)
        return self.temperatures.clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"temperatures": self.temperatures.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        temps = state["temperatures"].to(torch.float64).reshape(-1)
        if temps.shape != self.temperatures.shape:
            raise ValueError(f"{temps.numel()} temperatures for {self.temperatures.numel()} scales")
        self.temperatures = temps.clone()


@dataclass(frozen=True)
class TokenSample:
    """The tokens temperatures are fitted on: ``mask`` (m, L) marks the chosen
    positions of the images ``ids`` (m,)."""

    ids: torch.Tensor
    mask: torch.Tensor

    def shard(self, ctx: Dist) -> TokenSample:
        """This process's contiguous 1/world of the images."""
        per = -(-len(self.ids) // ctx.world)
        part = slice(ctx.rank * per, (ctx.rank + 1) * per)
        return TokenSample(self.ids[part], self.mask[part])


def token_sample(ids: torch.Tensor, patch_nums, per_scale: int, seed: int) -> TokenSample:
    """At most ``per_scale`` tokens of every scale among the images ``ids``, drawn
    once from ``seed`` (0: every token).

    Temperature fits hold the logits of what they fit on (V floats per token):
    on ImageNet's 5 % slice that is ~680 GB for every token, ~3 GB per scale
    for a 200k sample, whose fitted temperature differs from the full one by
    sampling noise of order 1/sqrt(200k)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for p in patch_nums:
        count = len(ids) * p * p
        block = torch.ones(count, dtype=torch.bool)
        if 0 < per_scale < count:
            block.zero_()[torch.randperm(count, generator=gen)[:per_scale]] = True
        blocks.append(block.view(len(ids), p * p))
    mask = torch.cat(blocks, 1)
    used = mask.any(1)
    return TokenSample(ids[used], mask[used])


def fit_scale_temperatures(model: VAR, split: TeacherForcedBatches, sample: TokenSample, batch_size: int,
                           bf16: bool, calibrator: TemperatureCalibrator,
                           ctx: Dist = Dist()) -> torch.Tensor:
    """One temperature per scale fitted on ``sample`` (current weights, true labels):
    the calibrated reference's refits, the teacher's and `ts`'s one fit. Under DDP
    every process predicts its shard of the images and keeps only the sampled
    tokens' logits; the fit sums its statistics over processes (`fit_temperature`)."""
    mine = sample.shard(ctx)
    logits, targets, scales, done = [], [], [], 0
    for batch_logits, batch_targets in predict(model, split, mine.ids, batch_size, bf16):
        keep = mine.mask[done:done + len(batch_targets)].to(batch_targets.device)
        logits.append(batch_logits[keep])
        targets.append(batch_targets[keep])
        scales.append(model.scale_ids.expand_as(batch_targets)[keep])
        done += len(batch_targets)
    vocab = model.vocab_size
    logits = torch.cat(logits) if logits else torch.zeros(0, vocab, device=model.scale_ids.device)
    targets = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    scales = torch.cat(scales) if scales else torch.zeros(0, dtype=torch.long)
    reduce = None if ctx.world == 1 else partial(all_reduce_sum, device=logits.device)
    return calibrator.fit(logits, targets.to(logits.device), scales.to(logits.device), reduce)
