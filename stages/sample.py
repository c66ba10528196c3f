"""sample@variant: class-conditional images with per-token uncertainty.

Outputs under samples/{variant}-s{seed}/: samples.pt (images, labels,
uncertainty maps and aggregates; written last, so its presence means the
stage finished), grid.png (rows = classes, at most sample.grid_classes of
them), uncertainty_map.png, params.json and, on request, one PNG per image.
Under torchrun (params.yaml's launcher) the ranks share the batches and rank 0
writes: each batch draws from its own seeded stream, so the files do not
depend on the number of processes. A temperature-scaled (`ts`) run records its
uncertainty from its fitted temperatures; its images are its base model's, bitwise,
unless it samples at the temperatures (``sample_at_temperatures``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from up.core import paths
from up.core.distributed import distributed
from up.core.io import save_figure, save_image_grid, save_json, save_torch
from up.core.params import Params, SampleParams
from up.core.runtime import resolve_device
from up.data.sources import spread_classes
from up.generation.sampler import compile_for_sampling, sample_many
from up.models.tokenizer import load_code_clusters, load_tokenizer
from up.models.transformer import load_var_for_sampling

TOKENIZER = paths.TOKENIZER


def grid_rows(labels: torch.Tensor, num_rows: int, per_row: int) -> torch.Tensor:
    """Indices of the images in the grid: the first ``per_row`` of each of at most
    ``num_rows`` classes spread over the labels (unconditional: the first images,
    ``per_row`` per row)."""
    if (labels < 0).all():
        return torch.arange(min(len(labels), num_rows * per_row))
    classes = spread_classes(labels.unique(), num_rows).tolist()
    rows = [torch.nonzero(labels == c).flatten()[:per_row] for c in classes]
    return torch.cat(rows)


def uncertainty_figure(images: torch.Tensor, entropy: torch.Tensor, titles: list[str]):
    """Images (top) over their finest-scale entropy maps, upsampled and overlaid (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    n = len(images)
    side = images.shape[-1]
    heat = F.interpolate(entropy[:, None].float(), size=(side, side), mode="nearest")[:, 0]
    gray = images.float().mean(1) / 255.0
    fig, axes = plt.subplots(2, n, figsize=(1.4 * n + 0.8, 3.2), squeeze=False)
    vmax = float(entropy.max()) or 1.0
    for i in range(n):
        pic = images[i].permute(1, 2, 0).squeeze(-1).numpy()
        axes[0, i].imshow(pic, cmap="gray" if pic.ndim == 2 else None, vmin=0, vmax=255)
        axes[0, i].set_title(titles[i], fontsize=7)
        axes[1, i].imshow(gray[i].numpy(), cmap="gray", vmin=0, vmax=1)
        shown = axes[1, i].imshow(heat[i].numpy(), cmap="magma", alpha=0.65, vmin=0, vmax=vmax)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1, 0].set_ylabel("entropy\n(finest scale)", fontsize=7)
    fig.colorbar(shown, ax=axes[1, :].tolist(), fraction=0.02, pad=0.01, label="nats")
    return fig


def save_figures(images: torch.Tensor, labels: torch.Tensor, uncertainty: dict, sp: SampleParams,
                 out: Path) -> None:
    """grid.png (rows = classes, at most ``sp.grid_classes``) and uncertainty_map.png (one
    image of each of at most 10 of those classes over its finest-scale entropy)."""
    per_row = min(sp.grid_per_class, sp.n_per_class)
    save_image_grid(images[grid_rows(labels, sp.grid_classes, per_row)], out / paths.GRID,
                    nrow=per_row)
    shown = grid_rows(labels, min(sp.grid_classes, 10), 1)
    finest = uncertainty["maps"]["entropy"][-1][shown]
    image_h = uncertainty["image"]["entropy"][shown]
    titles = [("uncond" if labels[i] < 0 else f"class {labels[i]}") + f"\nH={h:.2f}"
              for i, h in zip(shown.tolist(), image_h.tolist(), strict=True)]
    save_figure(uncertainty_figure(images[shown], finest, titles), out / paths.UNCERTAINTY_MAP)


def run(params: Params, variant: str, seed: int) -> None:
    """Under torchrun every rank samples its share of the batches; rank 0 writes."""
    sp = params.sample
    # fails early, naming the declared variants; the dispersion is recorded with the
    # variant's own evidence mass (up's kappa; 1.0 for variants without one)
    kappa = float(getattr(params.variant(variant), "kappa", 1.0))
    device = resolve_device(params.device)
    out = paths.samples(variant, seed)
    checkpoint = paths.model(variant, seed)

    with distributed(device.type) as ctx:
        tokenizer = load_tokenizer(TOKENIZER, device)
        code_to_cluster, num_clusters = load_code_clusters(TOKENIZER)
        var, scale_temperatures, at_temperatures = load_var_for_sampling(checkpoint, ema=True)
        var = compile_for_sampling(var.to(device), sp.compile)
        num_classes = var.num_classes
        classes = torch.arange(num_classes).repeat_interleave(sp.n_per_class)
        labels = torch.full_like(classes, -1) if sp.unconditional else classes
        bf16 = device.type == "cuda" and params.train.bf16
        result = sample_many(var, tokenizer, labels, sp.batch_size, seed, f"sample {variant}-s{seed}",
                             ctx, bf16, guidance=sp.guidance, guidance_schedule=sp.guidance_schedule,
                             top_k=sp.top_k, top_p=sp.top_p, temperature=sp.temperature, draw=sp.draw,
                             scale_temperatures=scale_temperatures,
                             sample_at_temperatures=at_temperatures,
                             code_to_cluster=code_to_cluster, num_clusters=num_clusters, kappa=kappa)
    if result is None:
        return
    images, labels = result["images"], result["labels"]

    config = dict(variant=variant, seed=seed, checkpoint=str(checkpoint), tokenizer=str(TOKENIZER),
                  num_images=len(labels), num_classes=num_classes, kappa=kappa, device=str(device),
                  bf16=bf16, scale_temperatures=None if scale_temperatures is None
                  else scale_temperatures.tolist(), sample_at_temperatures=at_temperatures,
                  **sp.model_dump())
    if sp.save_pngs:
        for i, (img, label) in enumerate(zip(images, labels.tolist(), strict=True)):
            save_image_grid(img[None], out / paths.SAMPLE_PNGS / paths.sample_png(i, label),
                            nrow=1, padding=0)
    save_figures(images, labels, result["uncertainty"], sp, out)
    save_json(config, out / paths.RECORD)
    save_torch(dict(images=images, labels=labels, uncertainty=result["uncertainty"], seed=seed,
                    config=config), out / paths.SAMPLES_FILE)
