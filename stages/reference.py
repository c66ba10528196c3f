"""reference@seed: the empirical reference of `up` (reference: empirical) for one
training seed.

Counts of each code given a context over the images that training seed trains
on (every variant alike; with train.images_per_class > 0 the seed draws them),
one pass over the token cache, smoothed by a Dirichlet prior. The context and
the prior mass are chosen by the reference's own NLL on the calibration slice
(held out of training, the same for every seed); the table of candidates, and
the chosen one's NLL on the val tokens, go to metrics/reference-s<seed>.json.
"""

from __future__ import annotations

from up.core import paths
from up.core.errors import StageError
from up.core.io import load_torch, save_json, save_torch
from up.core.params import Params
from up.data.splits import load_token_arrays
from up.data.tokens import training_ids
from up.training.empirical import select_reference


def run(params: Params, seed: int) -> None:
    cfg, rp = params.train, params.reference
    train = load_token_arrays(paths.TOKENS, "train")
    val = load_token_arrays(paths.TOKENS, "val")
    vocab = int(load_torch(paths.TOKENIZER, "tokenizer")["config"]["vocab_size"])
    labels = train.labels.long()
    fit_ids, calib_ids = training_ids(labels, cfg.calib_fraction, cfg.images_per_class,
                                      params.seed, seed)
    if len(calib_ids) == 0:
        raise StageError("the reference is chosen on the calibration slice, but "
                         "train.calib_fraction = 0 holds none out: set it > 0")
    num_classes, patch_nums = len(train.classes), train.patch_nums
    table, rows = select_reference(train.indices[fit_ids], labels[fit_ids],
                                   train.indices[calib_ids], labels[calib_ids], patch_nums,
                                   vocab, num_classes, rp.contexts, rp.priors)
    best = min(rows, key=lambda r: r["heldout_nll"])
    metrics = {"context": best["context"], "prior": best["prior"],
               "heldout_nll": best["heldout_nll"],
               "val_nll": table.nll(val.indices, val.labels.long()),
               "memory_bytes": table.memory_bytes(), "train_images": len(fit_ids),
               "calibration_images": len(calib_ids), "candidates": rows}
    save_torch({"table": table.state_dict(), "fit_ids": fit_ids}, paths.reference(seed))
    save_json(metrics, paths.metrics(f"reference-s{seed}"))
    print(f"reference s{seed}: context {best['context']}, prior {best['prior']}, held-out NLL "
          f"{best['heldout_nll']:.4f}, val NLL {metrics['val_nll']:.4f} "
          f"({metrics['memory_bytes'] / 2**20:.1f} MiB)")
