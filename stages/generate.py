"""`up generate`: a sample grid from any VAR checkpoint, outside the pipeline.

Rows are the requested classes, ``n`` images each; a researcher's quick look
at a model with chosen seed, guidance and truncation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from up.core.errors import StageError
from up.core.io import save_image_grid
from up.core.params import Params
from up.core.runtime import resolve_device
from up.generation.sampler import compile_for_sampling, sample
from up.models.tokenizer import load_code_clusters, load_tokenizer
from up.models.transformer import load_var_for_sampling


def run(params: Params, checkpoint: Path, tokenizer: Path, classes: list[int], n: int,
        seed: int, guidance: float | None, top_k: int | None, top_p: float | None,
        temperature: float | None, out: Path) -> None:
    """Sampling settings left None come from params.yaml's `sample` section."""
    sp = params.sample
    guidance = sp.guidance if guidance is None else guidance
    top_k = sp.top_k if top_k is None else top_k
    top_p = sp.top_p if top_p is None else top_p
    temperature = sp.temperature if temperature is None else temperature
    device = resolve_device(params.device)
    var, scale_temperatures, at_temperatures = load_var_for_sampling(checkpoint, ema=True)
    var = compile_for_sampling(var.to(device), sp.compile)
    bad = [c for c in classes if not 0 <= c < var.num_classes]
    if bad or not classes or n < 1:
        raise StageError(f"need n >= 1 (got {n}) and classes in 0..{var.num_classes - 1} "
                         f"(got {classes})")
    vq = load_tokenizer(tokenizer, device)
    code_to_cluster, num_clusters = load_code_clusters(tokenizer)
    labels = torch.tensor(classes).repeat_interleave(n)
    generator = torch.Generator(device=device).manual_seed(seed)
    images, _, unc = sample(var, vq, labels, guidance=guidance,
                            guidance_schedule=sp.guidance_schedule, top_k=top_k, top_p=top_p,
                            temperature=temperature, draw=sp.draw, scale_temperatures=scale_temperatures,
                            sample_at_temperatures=at_temperatures, generator=generator,
                            code_to_cluster=code_to_cluster, num_clusters=num_clusters)
    save_image_grid(images, out, nrow=n)
    print(f"wrote {out}: {len(classes)} classes x {n} images, seed {seed}, guidance {guidance}, "
          f"mean token entropy {unc['image']['entropy'].mean():.3f} nats")
