"""train@variant: train the VAR transformer with one variant's loss and seed.

The checkpoint lives in checkpoints/, outside every DVC output, because DVC
deletes a stage's outputs before running it: a killed `dvc repro` resumes
from it. It is removed once the outputs are written, so a later run (after
a code change, say) trains afresh instead of reloading a finished state.
Under torchrun every process runs this; rank 0 writes the outputs.
"""

from __future__ import annotations

from pathlib import Path

from up.config import Params
from up.io import save_json, save_torch, save_tsv
from up.runtime import resolve_device
from up.train import distributed, resolved_params, train


def run(params: Params, variant: str, seed: int) -> None:
    tag = f"{variant}-s{seed}"
    checkpoint = Path(f"checkpoints/var-{tag}.pt")
    with distributed(resolve_device(params.device).type) as ctx:
        result = train(params, variant, seed, checkpoint=checkpoint, ctx=ctx)
    if result is None:
        return
    model = Path(f"models/var-{tag}.pt")
    save_torch(result.model, model)
    save_json(resolved_params(params, variant, seed), model.with_suffix(".params.json"))
    save_json(result.metrics, f"metrics/train-{tag}.json")
    save_tsv(result.rows, f"plots/train/{tag}.tsv")
    checkpoint.unlink(missing_ok=True)
