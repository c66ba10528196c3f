"""evaluate@variant: quality, diversity, calibration and selective generation of one run.

Generated images (samples/{variant}-s{seed}) are compared with the test split
(FID, KID, IS, precision, recall); token calibration is measured on the val tokens
with the run's transformer. Every generated image gets a quality that does not
depend on the rest of the set (the evaluator's log p(y_cond | x) and the realism
score against the real training images of its class) and a failure flag
(misclassified, or realism below evaluate.realism_threshold), whose split-half
reliability is reported; selective generation ranks images within their class by
each uncertainty score and compares them with the random and oracle rankings,
also at the tails (the failure rate of the most and least certain images) and
scale by scale. Outputs: metrics/eval-{variant}-s{seed}.json (flat main figures, with
sample counts and seeds) and plots/eval/{variant}-s{seed}/ (reliability,
risk-coverage curves, selective statistics with bootstrap intervals, stratified
subset FID, score correlations and per-sample rows, as JSON and PNGs).

Under torchrun (params.yaml's launcher) the ranks share the network passes
(features of the samples, of the test and training splits, the val tokens' predictions)
in fixed batches; rank 0 gathers them, computes every figure and writes, so
the outputs do not depend on the number of processes. With
evaluate.reference_stats, FID is also measured against those published
statistics (``fid_reference_stats``).
"""

from __future__ import annotations

import torch

from up.core import paths
from up.core.distributed import Dist, distributed
from up.core.errors import StageError
from up.core.io import load_torch, save_figure, save_json
from up.core.params import Params
from up.core.runtime import resolve_device
from up.core.sharding import map_batches
from up.data.splits import load_image_split
from up.data.tokens import load_token_split
from up.evaluation.calibration import CalibrationMeter
from up.evaluation.evaluator import evaluator_outputs
from up.evaluation.fidelity import (
    FidelityConfig,
    ImageFeatures,
    SubsetQuality,
    config_from_params,
    frechet_distance_to_stats,
    image_features,
    load_reference_stats,
    quality_from_features,
)
from up.evaluation.figures import (
    correlation_figure,
    reliability_figure,
    risk_coverage_figure,
    selective_figure,
)
from up.evaluation.selective import (
    class_accuracy,
    evaluator_log_p,
    failure_labels,
    kept_count,
    per_class_subset,
    scale_auroc,
    score_correlations,
    selective_figures,
    selective_statistics,
    set_figures,
    stratified_curves,
)
from up.generation.scores import ALL_MEASURES, image_scores
from up.models.temperature import predict
from up.models.tokenizer import load_tokenizer
from up.models.transformer import load_var_and_temperatures

EVALUATOR, TOKENIZER = paths.EVALUATOR, paths.TOKENIZER


def merge_meters(parts: list[CalibrationMeter]) -> CalibrationMeter:
    """One meter from per-batch meters, added in batch order: the same sums however
    many ranks computed the parts."""
    meter = CalibrationMeter(parts[0].n_bins)
    for part in parts:
        meter.sums += part.sums
        meter.nll += part.nll
        meter.brier += part.brier
        meter.count += part.count
    return meter


def calibration(params: Params, variant: str, seed: int, device: torch.device, ctx: Dist = Dist()
                ) -> tuple[dict, list[dict]] | None:
    """ECE, NLL, Brier, top-1 accuracy and reliability bins of the token predictions
    on every val token (true labels, no guidance), batch by batch, the batches shared
    among ``ctx``'s ranks; None on ranks other than 0."""
    tokenizer = load_tokenizer(TOKENIZER, device)
    var, temperatures = load_var_and_temperatures(paths.model(variant, seed))
    var = var.to(device)
    val = load_token_split(paths.TOKENS, "val", tokenizer, device)

    def batch(_: int, ids: torch.Tensor) -> CalibrationMeter:
        meter = CalibrationMeter(params.evaluate.ece_bins)
        for logits, targets in predict(var, val, ids, len(ids), params.train.bf16, temperatures):
            meter.update(logits, targets)
        return meter

    parts = map_batches(batch, len(val), params.train.batch_size, ctx, f"calibration {variant}")
    if parts is None:
        return None
    meter = merge_meters(parts)
    figures = {**meter.figures(), "n_val_images": len(val), "n_val_tokens": meter.count}
    return figures, meter.bins()


def quality_figures(gen: dict, real: dict, config: FidelityConfig,
                    reference: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    """FID, KID, IS, precision, recall (and FID against the reference statistics)."""
    quality = quality_from_features(gen, real, config)
    if reference is not None:
        quality["fid_reference_stats"] = frechet_distance_to_stats(gen["fid"], *reference)
    return quality


def evaluator_only(net: ImageFeatures):
    """The evaluator's features of an image batch, without the fidelity network: all
    that realism reads from the training split."""
    def features(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": evaluator_outputs(net.evaluator, images, len(images), net.device)[0]}

    return features


def run(params: Params, variant: str, seed: int) -> None:
    ev = params.evaluate
    params.variant(variant)
    device = resolve_device(params.device)

    samples = load_torch(paths.samples(variant, seed) / paths.SAMPLES_FILE, "samples")
    test = load_image_split(paths.PREPARED, "test")
    train = load_image_split(paths.PREPARED, "train")
    kept = per_class_subset(train.labels, ev.realism_per_class, params.seed)
    train_images, train_labels = train.images.subset(kept.numpy()), train.labels[kept]
    fewest = int(torch.unique(train_labels, return_counts=True)[1].min())
    if fewest < 2 * (ev.realism_k + 1):
        raise StageError(f"the training split keeps {fewest} images of its smallest class; realism "
                         f"with evaluate.realism_k={ev.realism_k} in each half of a class needs "
                         f"{2 * (ev.realism_k + 1)} (lower realism_k or raise realism_per_class)")
    gen, real = samples["images"], test.images
    smallest = kept_count(len(gen), min(ev.selective_fractions))
    if smallest <= ev.pr_neighborhood:
        raise StageError(f"selective generation keeps {smallest} of {len(gen)} samples at fraction "
                         f"{min(ev.selective_fractions)}; precision/recall needs more than "
                         f"evaluate.pr_neighborhood={ev.pr_neighborhood} (raise sample.n_per_class)")
    config = config_from_params(ev, str(EVALUATOR), device.type == "cuda", seed)
    with distributed(device.type) as ctx:
        net = ImageFeatures(config, EVALUATOR, device)
        reference = None if ev.reference_stats is None else \
            load_reference_stats(ev.reference_stats, net.fidelity.dim)
        gen_out = image_features(gen, net, config.batch_size, ctx, f"features {variant}-s{seed}")
        real_out = image_features(real, net, config.batch_size, ctx, "features test split")
        train_out = image_features(train_images, evaluator_only(net), config.batch_size, ctx,
                                   "features train split")
        calib = calibration(params, variant, seed, device, ctx)
    if ctx.main:
        report(params, variant, seed, samples, gen_out, real_out, test.labels,
               (train_out["features"], train_labels), calib,
               quality_figures(gen_out, real_out, config, reference), config)


def report(params: Params, variant: str, seed: int, samples: dict, gen: dict, real: dict,
           real_labels: torch.Tensor, train: tuple[torch.Tensor, torch.Tensor],
           calibrated: tuple[dict, list[dict]], quality: dict, config: FidelityConfig) -> None:
    """Every figure from the gathered features, written by rank 0 alone; ``train`` the
    evaluator's features and the labels of the real training images (the failure
    label's reference)."""
    ev = params.evaluate
    name = paths.run_tag(variant, seed)
    plots = paths.eval_plots(variant, seed)
    labels = samples["labels"]
    calib, bins = calibrated
    gen_features, gen_logits, gen_fid = gen["features"], gen["logits"], gen["fid"]
    # unconditional samples have no label: group them by the evaluator's class
    gen_classes = torch.where(labels >= 0, labels, gen_logits.argmax(1))

    # per-sample quality, independent of the rest of the set; realism against the
    # class's training images, the label's reliability from their two halves
    log_p = evaluator_log_p(gen_logits, gen_classes)
    realism, failed, label = failure_labels(gen_features, gen_logits.argmax(1), gen_classes,
                                            *train, ev.realism_k, ev.realism_threshold,
                                            params.seed)
    neg_log_realism = -realism.clamp_min(1e-12).log()
    maps = samples["uncertainty"]["maps"]
    scores = image_scores(maps)
    stats, curves = selective_statistics(
        scores, gen_classes, failed,
        risks={"failure": failed.double(), "nll": -log_p, "neg_log_realism": neg_log_realism},
        qualities={"log_p": log_p, "realism": realism}, repeats=ev.bootstrap, seed=seed)
    correlations = score_correlations(scores, gen_classes)
    subset_quality = SubsetQuality(real["fid"], config)

    def metric(kept: torch.Tensor) -> dict:
        return {**subset_quality(gen_fid[kept]),
                "class_accuracy": class_accuracy(gen_logits[kept], labels[kept])}

    # subset FID only with per-class stratification, for the all-token scores (the scale
    # groups would triple its cost); 'oracle' ranks by -log p(y | x)
    whole = {sc: v for sc, v in scores.items() if sc in ALL_MEASURES}
    rows = stratified_curves({**whole, "oracle": -log_p}, gen_classes, ev.selective_fractions,
                             metric, ev.random_repeats, seed)
    smallest = min(ev.selective_fractions)
    n_gen, n_real = len(gen_fid), len(real["fid"])
    figures = {
        **quality,
        **set_figures(gen, real, gen_classes, labels, real_labels, ev.pr_neighborhood),
        **calib,
        **label,
        "log_p_mean": log_p.mean().item(),
        "realism_median": realism.median().item(),
        **selective_figures(rows, stats, smallest),
        **scale_auroc(maps, gen_classes, failed, ev.bootstrap, seed),
        "n_samples": n_gen,
        "n_real": n_real,
        "n_real_train": len(train[1]),
        "n_bootstrap": ev.bootstrap,
        "seed": seed,
        "sample_seed": int(samples["seed"]),
        "feature_extractor": ev.feature_extractor,
    }
    per_sample = [{"index": i, "label": int(labels[i]), "class": int(gen_classes[i]),
                   "predicted": int(gen_logits[i].argmax()), "log_p": float(log_p[i]),
                   "realism": float(realism[i]), "failed": bool(failed[i]),
                   **{sc: float(v[i]) for sc, v in scores.items()}} for i in range(n_gen)]
    save_json(figures, paths.metrics(f"eval-{name}"))
    save_json(bins, plots / paths.RELIABILITY_JSON)
    save_json(rows, plots / paths.SELECTIVE_JSON)
    save_json(curves, plots / paths.RISK_COVERAGE_JSON)
    save_json(stats, plots / paths.SELECTIVE_STATS_JSON)
    save_json([{"score_a": a, "score_b": b, "spearman": correlations["spearman"][i][j]}
               for i, a in enumerate(correlations["scores"])
               for j, b in enumerate(correlations["scores"])], plots / paths.SCORE_CORRELATION_JSON)
    save_json(per_sample, plots / paths.PER_SAMPLE_JSON)
    label = f"{name} (N={n_gen} vs {n_real} test)"
    save_figure(reliability_figure({f"{name} ({calib['n_val_tokens']} val tokens)": bins}),
                plots / paths.RELIABILITY_PNG)
    save_figure(selective_figure({label: rows}), plots / paths.SELECTIVE_PNG)
    save_figure(risk_coverage_figure({label: curves}), plots / paths.RISK_COVERAGE_PNG)
    save_figure(correlation_figure(correlations, name), plots / paths.SCORE_CORRELATION_PNG)
    print(f"evaluate {name}: FID {quality['fid']:.4g}, precision {quality['precision']:.3f}, "
          f"recall {quality['recall']:.3f}, ECE {calib['ece']:.4f}, failed "
          f"{figures['failure_rate']:.3f}, AUROC(entropy) {figures.get('auroc_entropy') or 0:.3f} "
          f"(N={n_gen})")
