"""Training, evaluation and codebook clustering of the multi-scale VQ-VAE.

Every batch also decodes the image from a random prefix of the scales (the
partial-decode loss): without it the finest scale does all the work and the
coarse tokens, which the transformer predicts first, carry almost nothing.
Dead codes are re-seeded from the batch's residuals so the codebook stays used.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from up.checkpoint import load_checkpoint, save_checkpoint
from up.config import TokenizerParams
from up.loop import StepLoop, check_finite
from up.schedule import StepBatches, lr_factor, set_lr
from up.tokenizer import MultiScaleVQVAE, to_float, to_uint8

USAGE_DECAY = 0.95  # running code usage: a window of ~20 steps, shorter than the re-seed period


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


def reseed_dead_codes(model: MultiScaleVQVAE, usage: torch.Tensor, residuals: torch.Tensor,
                      threshold: float, optimizer: torch.optim.Optimizer) -> int:
    """Reset codes used less than ``threshold`` x uniform to residual vectors of the batch.

    A dead code never wins an argmin, so it gets no gradient and stays dead;
    moving it onto a vector the quantiser actually sees gives it a chance.
    Its momentum is cleared so the stale update does not push it away again.
    """
    dead = torch.nonzero(usage < threshold).flatten()
    if dead.numel() == 0:
        return 0
    pick = torch.randint(len(residuals), (dead.numel(),), device="cpu").to(residuals.device)
    weight = model.quantizer.embedding.weight
    with torch.no_grad():
        weight[dead] = residuals[pick].to(weight.dtype)
    state = optimizer.state.get(weight)
    if state and "exp_avg" in state:
        state["exp_avg"][dead] = 0.0
    usage[dead] = 1.0
    return int(dead.numel())


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


def train_tokenizer(model: MultiScaleVQVAE, images: torch.Tensor, tp: TokenizerParams, seed: int,
                    checkpoint: str | Path, fingerprint: dict[str, Any],
                    device: torch.device | str = "cpu", stop_at: int | None = None) -> TrainState:
    """Train ``model`` in place on uint8 ``images`` for ``tp.steps`` steps; resume if possible.

    The data order and every random draw depend only on (seed, step) and the
    RNG state saved in the checkpoint, so a resumed run ends with the same
    weights as an uninterrupted one. ``stop_at`` ends (and checkpoints) early.
    """
    model.to(device, memory_format=torch.channels_last)  # faster small convs (oneDNN, cuDNN)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
    state = _resume(model, optimizer, checkpoint, fingerprint)
    usage = state.usage.to(device)
    batches = StepBatches(len(images), tp.batch_size, seed)
    num_scales = len(model.patch_nums)
    reseed_last = int(tp.reseed_until * tp.steps)
    loop = StepLoop("tokenizer", tp.steps, state.step, stop_at)
    model.train()
    for step in loop:
        started = time.perf_counter()
        lr = tp.lr * lr_factor(step, tp.steps, tp.warmup_steps, "cosine")
        set_lr(optimizer, lr)
        x = to_float(images[batches(step)]).to(device, memory_format=torch.channels_last)
        partial_k = None
        if tp.partial_weight > 0 and num_scales > 1:
            partial_k = int(torch.randint(1, num_scales, ()))
        out = model(x, partial_k=partial_k)
        recon = F.mse_loss(out.recon, x)
        partial = F.mse_loss(out.partial, x) if partial_k is not None else recon.new_zeros(())
        loss = recon + out.quantized.vq_loss + tp.partial_weight * partial
        check_finite({"loss": loss.item()}, step + 1, "the tokenizer training",
                     f"The last good checkpoint ({checkpoint}, step {state.step}) is kept; lower "
                     "tokenizer.lr or check the data.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        with torch.no_grad():
            codes = torch.cat([idx.flatten() for idx in out.quantized.indices])
            counts = torch.bincount(codes, minlength=model.vocab_size).float()
            usage.mul_(USAGE_DECAY).add_(counts * (model.vocab_size / len(codes)),
                                        alpha=1 - USAGE_DECAY)
        if tp.reseed_every and (step + 1) % tp.reseed_every == 0 and step + 1 <= reseed_last:
            state.reseeded += reseed_dead_codes(model, usage, out.quantized.residuals,
                                                tp.reseed_threshold, optimizer)
        state.curves.append({
            "step": step, "loss": round(loss.item(), 6), "recon": round(recon.item(), 6),
            "vq": round(out.quantized.vq_loss.item(), 6), "partial": round(partial.item(), 6),
            "partial_k": partial_k or 0, "lr": round(lr, 8), "used": int((counts > 0).sum())})
        state.step = step + 1
        state.wall_s += time.perf_counter() - started
        loop.info = f"loss {loss.item():.4f} recon {recon.item():.4f}"
        if loop.due(tp.save_every):
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
def evaluate_tokenizer(model: MultiScaleVQVAE, images: torch.Tensor, batch_size: int = 256,
                       device: torch.device | str = "cpu") -> dict[str, Any]:
    """Reconstruction and codebook metrics on uint8 ``images``.

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
    for start in range(0, len(images), batch_size):
        x = to_float(images[start:start + batch_size]).to(device)
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
    meaning for semantic entropy (METHOD.md section 3).
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
    """uint8 rows: originals, reconstructions, then the decode after scales 1..K."""
    model.eval()
    x = to_float(images).to(device)
    indices = model.encode(x)
    rows = [x, model.decode(indices)]
    rows += [model.partial_decode(indices, k) for k in range(1, len(model.patch_nums) + 1)]
    return to_uint8(torch.cat(rows).cpu())
