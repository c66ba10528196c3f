"""train@variant: train the VAR transformer with one variant's loss and seed.

Variants under `derived` are built from the `teacher` model: `loss: ts` fits
its per-scale temperatures (no training), `reference: teacher` trains against
it; a `post_hoc` run `<run>+ts` fits temperatures over `<run>`'s model. The
checkpoint lives in checkpoints/, outside every DVC output, because DVC
deletes a stage's outputs before running it: a killed `dvc repro` resumes
from it. It is removed once the outputs are written, so a later run (after
a code change, say) trains afresh instead of reloading a finished state.
Under torchrun every process runs this; rank 0 writes the outputs.
"""

from __future__ import annotations

from up.core import paths
from up.core.distributed import distributed
from up.core.io import save_json, save_torch, save_tsv
from up.core.params import Params
from up.core.runtime import resolve_device
from up.training.losses import declaration
from up.training.run import (
    RunPaths,
    build_run,
    finish,
    resolved_params,
    temperature_scale,
    train,
)


def run(params: Params, variant: str, seed: int) -> None:
    tag = paths.run_tag(variant, seed)
    checkpoint = paths.checkpoint(variant, seed)
    spec, base = params.variant(variant), params.base(variant)
    run_paths = RunPaths(checkpoint, paths.TOKENS, paths.TOKENIZER,
                         teacher=None if base is None else paths.model(base, seed),
                         reference=paths.reference(seed))
    if declaration(spec.loss).module is None:  # post hoc (ts): fitted, not trained
        result = temperature_scale(params, variant, seed, run_paths)
    else:
        with distributed(resolve_device(params.device).type) as ctx:
            state = build_run(params, variant, seed, run_paths, ctx)
            train(state, checkpoint)
            if not ctx.main:
                return
            result = finish(state, params)
    model = paths.model(variant, seed)
    save_torch(result.model, model)
    save_json(resolved_params(params, variant, seed), paths.resolved_params(model))
    save_json(result.metrics, paths.metrics(f"train-{tag}"))
    save_tsv(result.rows, paths.train_curves(variant, seed))
    checkpoint.unlink(missing_ok=True)
