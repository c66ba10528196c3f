"""tokenizer: train the multi-scale VQ-VAE, measure it, cluster its codebook.

Like train@variant, it resumes a killed run from checkpoints/tokenizer.pt and
removes that checkpoint once the outputs are written, so a later (forced) run
trains afresh instead of reloading a finished state. Under torchrun every
process trains on its shard of each batch; rank 0 evaluates and writes.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from up.core import paths
from up.core.distributed import Dist, distributed, rank_device
from up.core.errors import StageError
from up.core.io import load_torch, save_image_grid, save_json, save_torch, save_tsv
from up.core.params import Params
from up.core.runtime import resolve_device
from up.data.splits import load_image_split
from up.training.tokenizer import (
    build_tokenizer,
    cluster_codebook,
    evaluate_tokenizer,
    progressive_grid,
    train_tokenizer,
)

CHECKPOINT = paths.TOKENIZER_CHECKPOINT
MODEL = paths.TOKENIZER


def given_tokenizer(path: Path, tp, channels: int):
    """(model, its code clusters or None) of ``tokenizer.init_from``, checked against
    the params that the rest of the pipeline reads."""
    from up.models.tokenizer import load_tokenizer

    model = load_tokenizer(path, "cpu")
    want = {"vocab_size": tp.vocab_size, "latent_channels": tp.latent_channels,
            "patch_nums": list(tp.patch_nums), "arch": tp.arch, "downsample": tp.downsample,
            "in_channels": channels}
    have = {"vocab_size": model.vocab_size, "latent_channels": model.latent_channels,
            "patch_nums": list(model.patch_nums), "arch": model.arch,
            "downsample": model.downsample, "in_channels": model.config["in_channels"]}
    wrong = [f"{k}: file {have[k]} vs params {want[k]}" for k in want if have[k] != want[k]]
    if wrong:
        raise StageError(f"tokenizer.init_from {path} does not match params.yaml ({'; '.join(wrong)})")
    saved = load_torch(path, "tokenizer")
    same = int(saved.get("num_clusters", -1)) == tp.semantic_clusters
    return model, saved["code_to_cluster"].long() if same else None


def training_fingerprint(params: Params) -> dict:
    """The settings that define the trained weights: a checkpoint resumes only under
    the same ones. How a run executes (launcher, processes, threads, device, bf16,
    micro-batches, checkpoint period, decode workers) is left out, so a run killed
    on one process resumes on eight, or with smaller micro-batches after an OOM."""
    return {"tokenizer": params.tokenizer.model_dump(exclude={"save_every", "micro_batch",
                                                                "bf16"}),
            "seed": params.seed, "data": params.data.model_dump(exclude={"workers"})}


def _channels(shape: tuple, tp) -> int:
    channels, height, width = shape[1:]
    if height != width or height != tp.patch_nums[-1] * tp.downsample:
        raise StageError(
            f"images are {height}x{width}; tokenizer.patch_nums ends at {tp.patch_nums[-1]} and "
            f"tokenizer.downsample is {tp.downsample}, so they must be square with side "
            f"{tp.patch_nums[-1] * tp.downsample}")
    return channels


def _trained(params: Params, channels: int, images, ctx: Dist):
    """(model on this rank's device, its code clusters or None, train state or None,
    metrics about how it was obtained)."""
    tp = params.tokenizer
    device = rank_device(resolve_device(params.device), ctx)
    if tp.init_from is not None:  # an imported tokenizer: the transformer it came with reads
        model, code_to_cluster = given_tokenizer(Path(tp.init_from), tp, channels)  # its codes
        return model.to(device), code_to_cluster, None, {"init_from": tp.init_from}
    model = build_tokenizer(tp, channels)
    state = train_tokenizer(model, images, tp, params.seed, CHECKPOINT,
                            training_fingerprint(params), device, ctx=ctx)
    return model, None, state, {"train_steps": state.step, "train_wall_s": round(state.wall_s, 2),
                                "reseeded_codes": state.reseeded}


def run(params: Params) -> None:
    tp = params.tokenizer
    train = load_image_split(paths.PREPARED, "train")
    val = load_image_split(paths.PREPARED, "val")
    channels = _channels(tuple(train.images.shape), tp)
    resolved = {"tokenizer": tp.model_dump(), "seed": params.seed, "threads": params.threads,
                "device": params.device, "data": params.data.model_dump()}

    started = time.perf_counter()
    with distributed(resolve_device(params.device).type) as ctx:
        model, code_to_cluster, state, trained = _trained(params, channels, train.images, ctx)
    if not ctx.main:
        return
    train_s = time.perf_counter() - started
    device = next(model.parameters()).device

    metrics = evaluate_tokenizer(model, val.images, device=device)
    shown = torch.linspace(0, len(val) - 1, min(tp.grid_images, len(val)))
    grid = progressive_grid(model, val.images[shown.long()], device)  # spread over classes
    if code_to_cluster is None:
        code_to_cluster = cluster_codebook(model.quantizer.embedding.weight, tp.semantic_clusters,
                                           params.seed, params.threads)
    save_torch({"config": model.config, "state_dict": model.cpu().state_dict(),
                "code_to_cluster": code_to_cluster, "num_clusters": tp.semantic_clusters}, MODEL)
    save_json(resolved, paths.resolved_params(MODEL))
    save_json({**metrics, **trained, "stage_train_s": round(train_s, 2),
               "clusters_used": int(torch.unique(code_to_cluster).numel())},
              paths.metrics("tokenizer"))
    save_tsv(state.curves if state is not None else [{"step": 0, "loss": 0.0}],
             paths.TOKENIZER_CURVES)
    save_image_grid(grid, paths.TOKENIZER_GRID, nrow=len(shown))
    CHECKPOINT.unlink(missing_ok=True)
