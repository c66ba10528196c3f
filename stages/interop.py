"""`up import-var` / `up export-var`: VAR's released checkpoints in and out.

Import turns VAR's VQ-VAE and transformer state dicts into the project's
``models/tokenizer.pt`` (with the codebook clusters semantic entropy needs)
and a ``models/var-*.pt`` checkpoint in the format training writes, so that
sampling, evaluation and fine-tuning (``train.init_from``) use them like any
model trained here. Export writes the reverse: plain state dicts under VAR's
key names that VAR's own code and demo notebook load with
``load_state_dict(..., strict=True)``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from up.core import paths
from up.core.errors import StageError
from up.core.io import load_torch, save_torch
from up.core.params import Params
from up.models.interop import check_pair, export_vae, export_var, import_vae, import_var
from up.models.tokenizer import load_tokenizer
from up.models.transformer import load_var_and_temperatures
from up.training.tokenizer import cluster_codebook


def load_state_dict(path: Path, what: str) -> Mapping[str, torch.Tensor]:
    """A released ``.pth`` (a flat state dict), loaded without running pickled code."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise StageError(f"{what} {path} is not a readable torch state dict: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise StageError(f"{what} {path} is not a flat state dict (key -> tensor)")
    return state


def import_checkpoints(params: Params, vae: Path | None, var: Path | None,
                       tokenizer_out: Path, var_out: Path | None,
                       clusters: int | None) -> list[Path]:
    """Write our tokenizer and/or transformer checkpoints from VAR's files."""
    if vae is None and var is None:
        raise StageError("give --vae, --var or both")
    written = []
    transformer = None
    if var is not None:
        transformer = import_var(load_state_dict(var, "VAR transformer"))
    if vae is not None:
        patch_nums = None if transformer is None else transformer.patch_nums
        tokenizer = import_vae(load_state_dict(vae, "VAR VQ-VAE"), patch_nums)
        if transformer is not None:
            check_pair(tokenizer, transformer)
        num_clusters = params.tokenizer.semantic_clusters if clusters is None else clusters
        if not 1 <= num_clusters <= tokenizer.vocab_size:
            raise StageError(f"{num_clusters} semantic clusters for a codebook of "
                             f"{tokenizer.vocab_size} codes (use --clusters)")
        code_to_cluster = cluster_codebook(tokenizer.quantizer.embedding.weight, num_clusters,
                                           params.seed, params.threads)
        save_torch({"config": tokenizer.config, "state_dict": tokenizer.state_dict(),
                    "code_to_cluster": code_to_cluster, "num_clusters": num_clusters,
                    "imported_from": str(vae)}, tokenizer_out)
        written.append(tokenizer_out)
    if transformer is not None:
        out = var_out or paths.imported_var(transformer.depth)
        save_torch({"config": transformer.config(), "state_dict": transformer.state_dict(),
                    "ema_state_dict": None,
                    "variant": {"name": "imported", "imported_from": str(var)},
                    "temperatures": None, "logit_temperatures": None, "step": 0}, out)
        written.append(out)
    return written


def export_checkpoints(tokenizer: Path | None, checkpoint: Path | None, vae_out: Path | None,
                       var_out: Path | None, ema: bool) -> list[Path]:
    """Write VAR-format state dicts of our tokenizer and/or transformer."""
    if tokenizer is None and checkpoint is None:
        raise StageError("give --tokenizer, --checkpoint or both")
    written = []
    vq = transformer = None
    if tokenizer is not None:
        vq = load_tokenizer(tokenizer)
    if checkpoint is not None:
        load_torch(checkpoint, "VAR checkpoint")  # a clear error for a missing file
        transformer, temperatures = load_var_and_temperatures(checkpoint, ema=ema)
        if temperatures is not None:
            print(f"warning: {checkpoint} has per-scale logit temperatures "
                  f"{[round(float(t), 4) for t in temperatures]}; VAR has no such setting, "
                  f"the exported weights sample at temperature 1", file=sys.stderr)
    if vq is not None and transformer is not None:
        check_pair(vq, transformer)
    if vq is not None:
        state = export_vae(vq)
        c = vq.config
        out = vae_out or paths.exported_vae(c["base_width"], c["vocab_size"], c["latent_channels"])
        save_torch(state, out)
        written.append(out)
    if transformer is not None:
        out = var_out or paths.exported_var(transformer.depth)
        save_torch(export_var(transformer), out)
        written.append(out)
    return written


def run(params: Params, action: str, **kwargs) -> None:
    if action == "import":
        written = import_checkpoints(params, **kwargs)
    elif action == "export":
        written = export_checkpoints(**kwargs)
    else:
        raise ValueError(f"unknown interop action {action!r}")
    for path in written:
        print(f"wrote {path}")
