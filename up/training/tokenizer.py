"""Training, evaluation and codebook clustering of the multi-scale VQ-VAE.

Every batch also decodes the image from a random prefix of the scales (the
partial-decode loss): without it the finest scale does all the work and the
coarse tokens, which the transformer predicts first, carry almost nothing.
Dead codes are re-seeded from the batch's residuals so the codebook stays used.

Scale: under torchrun every process takes a 1/world shard of each global
batch and splits it into micro-batches whose gradients accumulate (DDP
averages them over the processes once, on the last micro-batch), so the
update is the one on the whole global batch. Every random draw of a step (the
augmentation, the partial-decode prefix, the re-seed picks) is made for the
global batch from (seed, step) and then sharded, and the per-batch statistics
(code usage, re-seed vectors) are reduced over the processes, so every rank
holds the same codebook and the weights depend neither on the number of
processes nor on the micro-batch size (up to float summation order).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from up.core.distributed import Dist
from up.core.errors import StageError
from up.core.params import TokenizerParams
from up.core.runtime import autocast
from up.models.tokenizer import MultiScaleVQVAE, Quantized, to_float, to_uint8
from up.training.checkpoint import load_checkpoint, save_checkpoint
from up.training.loop import StepLoop, check_finite
from up.training.schedule import StepBatches, lr_factor, set_lr

USAGE_DECAY = 0.95  # running code usage: a window of ~20 steps, shorter than the re-seed period
CROP_ENLARGE = 1.125  # crop_flip: VAR's mid_reso, the enlarged side the crop is taken from
AUGMENT, PARTIAL, RESEED = range(3)  # the independent random streams of a step
LOSS_PARTS = ("loss", "recon", "vq", "partial")


def build_tokenizer(tp: TokenizerParams, in_channels: int) -> MultiScaleVQVAE:
    return MultiScaleVQVAE(in_channels=in_channels, widths=tp.widths, res_blocks=tp.res_blocks,
                           latent_channels=tp.latent_channels, vocab_size=tp.vocab_size,
                           patch_nums=tp.patch_nums, phi_share=tp.phi_share, beta=tp.beta,
                           arch=tp.arch, base_width=tp.base_width, ch_mult=tp.ch_mult)


@dataclass
class TrainState:
    """Everything a resumed run needs besides the model and optimizer."""

    step: int = 0  # completed steps
    usage: torch.Tensor | None = None  # running usage per code, 1 = uniform
    curves: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    reseeded: int = 0  # codes re-seeded so far


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, step, stream).

    Drawing from it instead of the global RNG is what lets a run resume on
    another number of processes: nothing random lives in a process's state.
    SeedSequence mixes the three numbers, so neighbouring seeds and steps
    give unrelated streams.
    """
    words = np.random.SeedSequence((seed, step, stream)).generate_state(2)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


def augment_images(x: torch.Tensor, kind: str, seed: int, step: int, start: int = 0,
                   total: int | None = None) -> torch.Tensor:
    """Random flips (``flip``) or VAR's crop of a 1.125x enlarged image, then flip
    (``crop_flip``), of float images ``x`` (n, C, S, S) in [-1, 1].

    ``x`` holds positions ``start .. start + n`` of a global batch of ``total``
    images (default: all of it): the draws are made for the whole global
    batch from (seed, step) and sliced, so a shard or micro-batch gets the
    same pixels it would have had in a single process.
    """
    if kind == "none":
        return x
    total = len(x) if total is None else total
    gen = step_generator(seed, step, AUGMENT)
    mine = slice(start, start + len(x))
    flip = (torch.rand(total, generator=gen) < 0.5)[mine]
    if kind == "crop_flip":
        side = x.shape[-1]
        big = round(side * CROP_ENLARGE)
        offsets = torch.randint(0, big - side + 1, (total, 2), generator=gen)[mine]
        x = _crop(_enlarge(x, big), offsets.to(x.device), side)
    elif kind != "flip":
        raise ValueError(f"unknown augmentation {kind!r}; allowed: none, flip, crop_flip")
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def _enlarge(x: torch.Tensor, side: int) -> torch.Tensor:
    """Bicubic (antialiased) resize to ``side``, clamped: bicubic overshoots [-1, 1]."""
    big = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
    return big.clamp(-1.0, 1.0)


def _crop(x: torch.Tensor, offsets: torch.Tensor, side: int) -> torch.Tensor:
    """Per-image ``side`` x ``side`` windows of ``x`` at ``offsets`` (n, 2) = (top, left)."""
    span = torch.arange(side, device=x.device)
    rows = (offsets[:, 0, None] + span)[:, :, None]
    cols = (offsets[:, 1, None] + span)[:, None, :]
    image = torch.arange(len(x), device=x.device)[:, None, None]
    return x[image, :, rows, cols].permute(0, 3, 1, 2)  # (n, S, S, C) -> (n, C, S, S)


def partial_prefix(seed: int, step: int, num_scales: int, weight: float) -> int | None:
    """The scales k in 1..K-1 the partial-decode loss of ``step`` decodes from (None: off).

    One k per step for the whole global batch, from (seed, step): every
    rank and micro-batch must decode the same prefix for the update to equal
    the single-process one.
    """
    if weight <= 0 or num_scales < 2:
        return None
    return int(torch.randint(1, num_scales, (), generator=step_generator(seed, step, PARTIAL)))


def _global_rows(rows: torch.Tensor, pick: torch.Tensor, ctx: Dist) -> torch.Tensor:
    """Rows ``pick`` of the global matrix whose rank-ordered blocks are each rank's ``rows``.

    Each rank fills the rows it holds and zeros elsewhere; the sum over ranks
    (x + 0 is exact) gives every rank the same vectors without gathering
    the whole matrix.
    """
    local = pick.to(rows.device) - ctx.rank * len(rows)
    mine = (local >= 0) & (local < len(rows))
    out = rows.new_zeros(len(pick), rows.shape[1])
    out[mine] = rows[local[mine]]
    if ctx.world > 1:
        dist.all_reduce(out)
    return out


def reseed_dead_codes(model: MultiScaleVQVAE, usage: torch.Tensor, residuals: torch.Tensor,
                      threshold: float, optimizer: torch.optim.Optimizer,
                      generator: torch.Generator | None = None, ctx: Dist = Dist()) -> int:
    """Reset codes used less than ``threshold`` x uniform to residual vectors of the batch.

    A dead code never wins an argmin, so it gets no gradient and stays dead;
    moving it onto a vector the quantiser actually sees gives it a chance.
    Its momentum is cleared so the stale update does not push it away again.
    ``residuals`` are this rank's rows of the global batch's residuals
    (image-major, so the global row order is the same for any world size);
    ``usage`` must be identical on every rank, and then so is the codebook.
    """
    dead = torch.nonzero(usage < threshold).flatten()
    if dead.numel() == 0:
        return 0
    pick = torch.randint(len(residuals) * ctx.world, (dead.numel(),), generator=generator)
    weight = model.quantizer.embedding.weight
    with torch.no_grad():
        weight[dead] = _global_rows(residuals, pick, ctx).to(weight.dtype)
    state = optimizer.state.get(weight)
    if state and "exp_avg" in state:
        state["exp_avg"][dead] = 0.0
    usage[dead] = 1.0
    return int(dead.numel())


def _residuals_by_image(quantized: Quantized, patch_nums: tuple[int, ...]) -> torch.Tensor:
    """(n, R, C): each image's residual vectors over all scales, from the quantiser's
    scale-major (sum_k n p_k^2, C); image-major rows concatenate over shards and
    micro-batches into the single-process order."""
    n = len(quantized.indices[0])
    sizes = [n * p * p for p in patch_nums]
    parts = quantized.residuals.split(sizes)
    return torch.cat([part.view(n, -1, part.shape[1]) for part in parts], dim=1)


def _resume(model: MultiScaleVQVAE, optimizer: torch.optim.Optimizer, checkpoint: str | Path,
            fingerprint: dict[str, Any]) -> TrainState:
    """The state of a checkpointed run of the same settings (weights and optimiser
    restored in place), or a fresh one."""
    saved = load_checkpoint(checkpoint, fingerprint)
    if saved is None:
        return TrainState(usage=torch.ones(model.vocab_size))
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return TrainState(step=saved["step"], usage=saved["usage"], curves=saved["curves"],
                      wall_s=saved["wall_s"], reseeded=saved["reseeded"])


def micro_batch_size(tp: TokenizerParams, world: int, n_images: int) -> int:
    """Images per forward pass; StageError when the global batch does not split evenly
    (unequal shards would weight the images unequally in the averaged gradient)."""
    if n_images < tp.batch_size:
        raise StageError(f"tokenizer.batch_size={tp.batch_size} exceeds the {n_images} "
                         "training images")
    if tp.batch_size % world:
        raise StageError(f"tokenizer.batch_size={tp.batch_size} is not divisible by the "
                         f"{world} processes")
    share = tp.batch_size // world
    micro = tp.micro_batch or share
    if share % micro:
        raise StageError(f"tokenizer.micro_batch={tp.micro_batch} does not divide the {share} "
                         f"images per process (tokenizer.batch_size={tp.batch_size} over "
                         f"{world} processes)")
    return micro


@dataclass
class StepResult:
    """What one step's forward passes measured, over the whole global batch."""

    values: dict[str, float]  # LOSS_PARTS, means over the global batch
    counts: torch.Tensor  # (V,) int64 uses of each code, every scale and image
    partial_k: int | None
    residuals: torch.Tensor | None  # this rank's residual rows, image-major (re-seed steps)


@dataclass
class Batches:
    """Where a rank's training images come from, and how a step is cut into forwards."""

    images: Any  # uint8 (N, C, H, W); images[ids] gives a batch
    order: StepBatches  # this rank's ids of each global batch
    micro: int
    device: torch.device


def _loss_parts(net: nn.Module, x: torch.Tensor, partial_k: int | None,
                partial_weight: float) -> tuple[torch.Tensor, Quantized]:
    """(LOSS_PARTS as a (4,) tensor, the quantiser's output); each part is a mean over
    the images of ``x``, so weighting it by their share gives the global mean."""
    out = net(x, partial_k=partial_k)
    recon = F.mse_loss(out.recon, x)
    partial = F.mse_loss(out.partial, x) if partial_k is not None else recon.new_zeros(())
    vq = out.quantized.vq_loss
    return torch.stack([recon + vq + partial_weight * partial, recon, vq, partial]), out.quantized


def accumulate_gradients(net: nn.Module, model: MultiScaleVQVAE, batches: Batches, step: int,
                         tp: TokenizerParams, seed: int, ctx: Dist,
                         keep_residuals: bool) -> StepResult:
    """Backward over this rank's micro-batches of ``step``: the gradients of the global
    batch's mean loss, all-reduced by DDP on the last micro-batch only."""
    ids = batches.order(step)
    chunks = ids.split(batches.micro)
    partial_k = partial_prefix(seed, step, len(model.patch_nums), tp.partial_weight)
    sums = torch.zeros(len(LOSS_PARTS), device=batches.device)
    counts = torch.zeros(model.vocab_size, dtype=torch.long, device=batches.device)
    residuals = []
    for i, chunk in enumerate(chunks):
        start = ctx.rank * len(ids) + i * batches.micro
        x = to_float(batches.images[chunk].to(batches.device))  # uint8 travels, 4x smaller
        x = augment_images(x, tp.augment, seed, step, start, tp.batch_size)
        x = x.contiguous(memory_format=torch.channels_last)  # faster small convs (oneDNN, cuDNN)
        weight = len(chunk) / len(ids)  # DDP's mean over ranks makes it 1 / global batch
        defer = ctx.world > 1 and i < len(chunks) - 1
        with net.no_sync() if defer else nullcontext():
            with autocast(batches.device, tp.bf16):
                parts, quantized = _loss_parts(net, x, partial_k, tp.partial_weight)
            (parts[0] * weight).backward()
        sums += parts.detach().float() * weight
        counts += torch.bincount(torch.cat([idx.flatten() for idx in quantized.indices]),
                                 minlength=model.vocab_size)
        if keep_residuals:
            residuals.append(_residuals_by_image(quantized, model.patch_nums).detach().float())
    if ctx.world > 1:
        dist.all_reduce(sums)
        sums /= ctx.world
        dist.all_reduce(counts)
    rows = torch.cat(residuals).flatten(0, 1) if keep_residuals else None
    return StepResult(dict(zip(LOSS_PARTS, sums.tolist(), strict=True)), counts, partial_k, rows)


def _wrap(model: MultiScaleVQVAE, device: torch.device, ctx: Dist) -> nn.Module:
    """DDP over the processes (the model itself in a single process). Its buffers (the
    bicubic matrices) are constants, so they are not re-broadcast every forward."""
    if ctx.world == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                   else None, broadcast_buffers=False)


def train_tokenizer(model: MultiScaleVQVAE, images: Any, tp: TokenizerParams, seed: int,
                    checkpoint: str | Path, fingerprint: dict[str, Any],
                    device: torch.device | str = "cpu", stop_at: int | None = None,
                    ctx: Dist = Dist()) -> TrainState:
    """Train ``model`` in place on uint8 ``images`` for ``tp.steps`` steps; resume if possible.

    The data order and every random draw depend only on (seed, step), so a
    resumed run ends with the same weights as an uninterrupted one, on any
    number of processes. ``stop_at`` ends (and checkpoints) early. Under
    torchrun (``ctx.world`` > 1) every rank calls this; rank 0 alone writes
    the checkpoint.
    """
    device = torch.device(device)
    micro = micro_batch_size(tp, ctx.world, len(images))
    model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
    state = _resume(model, optimizer, checkpoint, fingerprint)
    net = _wrap(model, device, ctx)
    usage = state.usage.to(device)
    batches = Batches(images, StepBatches(len(images), tp.batch_size, seed, ctx.rank, ctx.world),
                      micro, device)
    reseed_last = int(tp.reseed_until * tp.steps)
    loop = StepLoop("tokenizer", tp.steps, state.step, stop_at, show=ctx.main)
    model.train()
    for step in loop:
        started = time.perf_counter()
        lr = tp.lr * lr_factor(step, tp.steps, tp.warmup_steps, "cosine")
        set_lr(optimizer, lr)
        reseed = bool(tp.reseed_every) and (step + 1) % tp.reseed_every == 0 \
            and step + 1 <= reseed_last
        optimizer.zero_grad(set_to_none=True)
        result = accumulate_gradients(net, model, batches, step, tp, seed, ctx, reseed)
        check_finite({"loss": result.values["loss"]}, step + 1, "the tokenizer training",
                     f"The last good checkpoint ({checkpoint}, step {state.step}) is kept; lower "
                     "tokenizer.lr or check the data.")
        optimizer.step()
        with torch.no_grad():
            usage.mul_(USAGE_DECAY).add_(result.counts * (model.vocab_size / result.counts.sum()),
                                        alpha=1 - USAGE_DECAY)
        if reseed:
            state.reseeded += reseed_dead_codes(model, usage, result.residuals,
                                                tp.reseed_threshold, optimizer,
                                                step_generator(seed, step, RESEED), ctx)
        state.curves.append({
            "step": step, **{k: round(v, 6) for k, v in result.values.items()},
            "partial_k": result.partial_k or 0, "lr": round(lr, 8),
            "used": int((result.counts > 0).sum())})
        state.step = step + 1
        state.wall_s += time.perf_counter() - started
        loop.info = f"loss {result.values['loss']:.4f} recon {result.values['recon']:.4f}"
        if ctx.main and loop.due(tp.save_every):
            save_checkpoint(checkpoint, fingerprint=fingerprint, model=model.state_dict(),
                            optimizer=optimizer.state_dict(), step=state.step,
                            usage=usage.cpu(), curves=state.curves, wall_s=state.wall_s,
                            reseeded=state.reseeded)
    state.usage = usage.cpu()
    model.eval()
    return state


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [0, 1] (capped at 100 dB for a perfect match)."""
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate_tokenizer(model: MultiScaleVQVAE, images: Any, batch_size: int = 256,
                       device: torch.device | str = "cpu") -> dict[str, Any]:
    """Reconstruction and codebook metrics on uint8 ``images``, read batch by batch
    (``images[ids]``: a memory-mapped split is never loaded whole).

    Pixels are compared in [0, 1]. PSNR is the mean of per-image PSNRs (the
    usual convention), MSE the mean over all pixels. psnr_k[k] decodes from
    the first k scales only (k = K is the plain reconstruction); psnr_black is
    an all-black image, the floor to compare the coarse scales with. Usage is
    the fraction of the V codes used anywhere; perplexity = exp(entropy of the
    code frequencies).
    """
    model.eval()
    num_scales = len(model.patch_nums)
    image_mse: list[list[torch.Tensor]] = [[] for _ in range(num_scales)]
    black_mse = []
    counts = torch.zeros(model.vocab_size, dtype=torch.float64)
    for ids in torch.arange(len(images)).split(batch_size):
        x = to_float(images[ids].to(device))
        indices = model.encode(x)
        for k in range(1, num_scales + 1):
            err = ((model.partial_decode(indices, k) - x) / 2).square().flatten(1).mean(1)
            image_mse[k - 1].append(err.double().cpu())
        black_mse.append(((x + 1) / 2).square().flatten(1).mean(1).double().cpu())
        codes = torch.cat([idx.flatten() for idx in indices]).cpu()
        counts += torch.bincount(codes, minlength=model.vocab_size).double()
    mse_k = [torch.cat(errs) for errs in image_mse]
    psnr_k = [psnr(errs).mean().item() for errs in mse_k]
    freq = counts[counts > 0] / counts.sum()
    return {
        "mse": mse_k[-1].mean().item(),
        "psnr": psnr_k[-1],
        "usage": float((counts > 0).double().mean()),
        "perplexity": math.exp(-(freq * freq.log()).sum().item()),
        "psnr_k": {str(k + 1): value for k, value in enumerate(psnr_k)},
        "psnr_black": psnr(torch.cat(black_mse)).mean().item(),
        "images": len(images),
    }


def cluster_codebook(codebook: torch.Tensor, num_clusters: int, seed: int,
                     threads: int = 1) -> torch.Tensor:
    """k-means groups of the code vectors: int64 (V,) code -> cluster.

    Nearby codes decode to near-identical content, so a cluster is a unit of
    meaning for semantic entropy (docs/method.md section 3).
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    vectors = codebook.detach().double().cpu().numpy()
    with threadpool_limits(limits=threads):
        labels = KMeans(n_clusters=num_clusters, n_init=10, random_state=seed).fit_predict(vectors)
    return torch.as_tensor(labels, dtype=torch.int64)


@torch.no_grad()
def progressive_grid(model: MultiScaleVQVAE, images: torch.Tensor,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 rows: originals, reconstructions, then the decode after scales 1..K, of a
    few uint8 ``images`` (one batch, ``split[ids]``)."""
    model.eval()
    x = to_float(images.to(device))
    indices = model.encode(x)
    rows = [x, model.decode(indices)]
    rows += [model.partial_decode(indices, k) for k in range(1, len(model.patch_nums) + 1)]
    return to_uint8(torch.cat(rows).cpu())
