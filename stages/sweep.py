"""sweep@variant: the run's quality-diversity curves, along three axes.

Each row is one sampling setting, tagged with its ``axis``: ``guidance`` (each
value of ``sweep.guidance``, the other settings those of the sample stage),
``temperature`` (each sampling temperature of ``sweep.temperatures`` at
``sample.guidance``, for the runs of ``sweep.temperature_variants``: is a
softer model more than its baseline sampled hotter?) and ``truncation`` (one
row at ``sample.guidance`` with top-k of ``sweep.top_k_fraction`` of the codes
and top-p ``sweep.top_p``: the paper's truncated sampling). For every row the
run's model samples ``sweep.n_per_class`` images per class (with its per-scale
temperatures as in the sample stage) and they are scored at once: FID,
precision and recall against the test split (the feature network of
``evaluate.feature_extractor``), class accuracy and within-class diversity
(the evaluator's features, over the images it assigns to their class). The
images are not kept. Every row draws from the same sampling seed (the run's
training seed, as the sample stage): common random numbers across settings
and across variants of one seed, so curve differences are not sampling noise
of different draws.

Under torchrun the ranks share the batches: each samples its batches and
passes them through the feature networks, and rank 0 gathers the features
only (each batch draws from its own seeded stream: the rows do not depend on
the number of processes).

Output: metrics/sweep-{variant}-s{seed}.json, one row per setting: ``axis``,
``guidance``, ``temperature``, ``top_k``, ``top_p``, the scores and
``sample_seed``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from up.core import paths
from up.core.distributed import Dist, distributed
from up.core.errors import StageError
from up.core.io import save_json
from up.core.params import Params, SampleParams, SweepParams
from up.core.runtime import resolve_device
from up.core.sharding import cat_dicts, map_batches
from up.data.splits import load_image_split
from up.evaluation.fidelity import ImageFeatures, SubsetQuality, config_from_params, image_features
from up.evaluation.selective import class_accuracy, on_class_diversity
from up.generation.sampler import batch_sampler, compile_for_sampling
from up.models.tokenizer import load_code_clusters, load_tokenizer
from up.models.transformer import load_var_for_sampling


def truncation_top_k(fraction: float, vocab_size: int) -> int:
    """The truncation row's top-k: ``fraction`` of the codes, at least one."""
    return max(1, round(fraction * vocab_size))


def sweep_settings(sw: SweepParams, sp: SampleParams, variant: str, vocab_size: int
                   ) -> list[dict]:
    """The sampling settings of the rows, in order: the guidance axis, the temperature
    axis (``variant`` in ``sweep.temperature_variants`` only), the truncation row. Each
    is the sample section's setting with the axis's own value changed."""
    base = {"guidance": sp.guidance, "temperature": sp.temperature, "top_k": sp.top_k,
            "top_p": sp.top_p}
    rows = [{"axis": "guidance", **base, "guidance": g} for g in sorted(sw.guidance)]
    if variant in sw.temperature_variants:
        rows += [{"axis": "temperature", **base, "temperature": t} for t in sorted(sw.temperatures)]
    if sw.truncation:
        rows.append({"axis": "truncation", **base,
                     "top_k": truncation_top_k(sw.top_k_fraction, vocab_size), "top_p": sw.top_p})
    return rows


def describe(setting: dict) -> str:
    """A row's setting as the progress line names it."""
    if setting["axis"] == "truncation":
        return f"truncation top-k {setting['top_k']} top-p {setting['top_p']:g}"
    return f"{setting['axis']} {setting[setting['axis']]:g}"


def guidance_row(sampler: Callable, net: ImageFeatures, labels: torch.Tensor, batch_size: int,
                 quality: SubsetQuality | None, ctx: Dist, description: str) -> dict | None:
    """Quality and diversity of one row's samples (any axis), whose batches the ranks
    sample and pass through the networks; the row on rank 0 (``quality`` is rank 0's),
    None elsewhere."""
    parts = map_batches(lambda b, ids: net(sampler(b, ids)[0]), len(labels), batch_size, ctx,
                        description)
    if parts is None:
        return None
    out = cat_dicts(parts)
    features, logits = out["features"], out["logits"]
    return {**quality(out["fid"]), "class_accuracy": class_accuracy(logits, labels),
            "diversity": on_class_diversity(features, logits, labels), "n_samples": len(labels),
            "n_in_class": int((logits.argmax(1) == labels).sum())}


def run(params: Params, variant: str, seed: int) -> None:
    sw, sp, ev = params.sweep, params.sample, params.evaluate
    kappa = float(getattr(params.variant(variant), "kappa", 1.0))  # as the sample stage
    device = resolve_device(params.device)
    tag = paths.run_tag(variant, seed)
    checkpoint = paths.model(variant, seed)
    test = load_image_split(paths.PREPARED, "test")
    config = config_from_params(ev, str(paths.EVALUATOR), device.type == "cuda", seed)
    bf16 = device.type == "cuda" and params.train.bf16

    with distributed(device.type) as ctx:
        tokenizer = load_tokenizer(paths.TOKENIZER, device)
        code_to_cluster, num_clusters = load_code_clusters(paths.TOKENIZER)
        var, scale_temperatures, at_temperatures = load_var_for_sampling(checkpoint, ema=True)
        var = compile_for_sampling(var.to(device), sp.compile)
        labels = torch.arange(var.num_classes).repeat_interleave(sw.n_per_class)
        if len(labels) <= ev.pr_neighborhood:
            raise StageError(f"{len(labels)} samples per sweep row; precision/recall needs "
                             f"more than evaluate.pr_neighborhood={ev.pr_neighborhood} (raise "
                             "sweep.n_per_class)")
        net = ImageFeatures(config, paths.EVALUATOR, device)
        real = image_features(test.images, net.fidelity, config.batch_size, ctx,
                              "features test split")
        quality = None if real is None else SubsetQuality(real["fid"], config)
        kwargs = dict(guidance_schedule=sp.guidance_schedule, draw=sp.draw,
                      scale_temperatures=scale_temperatures, sample_at_temperatures=at_temperatures,
                      code_to_cluster=code_to_cluster, num_clusters=num_clusters, kappa=kappa)
        rows = []
        for setting in sweep_settings(sw, sp, variant, var.vocab_size):
            start = time.perf_counter()
            # the run's seed in every row: common random numbers along the curves
            sampler = batch_sampler(var, tokenizer, labels, seed, bf16, **kwargs,
                                    **{k: v for k, v in setting.items() if k != "axis"})
            row = guidance_row(sampler, net, labels, sp.batch_size, quality, ctx,
                               f"sweep {tag} {describe(setting)}")
            if row is None:
                continue
            rows.append({**setting, **row, "sample_seed": seed})
            shown = "n/a" if row["diversity"] is None else f"{row['diversity']:.3f}"
            print(f"sweep {tag} {describe(setting)}: FID {row['fid']:.4g}, precision "
                  f"{row['precision']:.3f}, recall {row['recall']:.3f}, class acc "
                  f"{row['class_accuracy']:.3f}, diversity {shown} (N={len(labels)}, "
                  f"{time.perf_counter() - start:.1f} s)")
    if not ctx.main:
        return
    save_json({"variant": variant, "seed": seed, "n_per_class": sw.n_per_class,
               "n_real": len(test.images), "feature_extractor": ev.feature_extractor,
               "guidance_schedule": sp.guidance_schedule, "temperature": sp.temperature,
               "top_k": sp.top_k, "top_p": sp.top_p, "device": str(device), "bf16": bf16,
               "scale_temperatures": None if scale_temperatures is None
               else scale_temperatures.tolist(), "sample_at_temperatures": at_temperatures,
               "rows": rows},
              paths.sweep(variant, seed))
