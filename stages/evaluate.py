"""evaluate@variant: quality, diversity, calibration and selective generation of one run.

Generated images (samples/{variant}-s{seed}) are compared with the test split;
token calibration is measured on the val tokens with the run's transformer.
Every generated image gets a quality that does not depend on the rest of the
set (the evaluator's log p(y_cond | x) and the realism score against the real
images of its class) and a failure flag (misclassified, or realism below
evaluate.realism_threshold); selective generation ranks images within their
class by each uncertainty score and compares them with the random and oracle
rankings. Outputs: metrics/eval-{variant}-s{seed}.json (flat main figures, with
sample counts and seeds) and plots/eval/{variant}-s{seed}/ (reliability,
risk-coverage curves, selective statistics with bootstrap intervals, stratified
subset FID, score correlations and per-sample rows, as JSON and PNGs).
"""

from __future__ import annotations

import torch

from up import paths
from up.calibration import CalibrationMeter
from up.config import Params
from up.errors import StageError
from up.evaluator import evaluator_outputs, load_evaluator
from up.fidelity import SubsetQuality, compute_quality, config_from_params, extract_features
from up.figures import (
    correlation_figure,
    reliability_figure,
    risk_coverage_figure,
    selective_figure,
)
from up.io import load_torch, save_figure, save_json
from up.runtime import resolve_device
from up.selective import (
    class_accuracy,
    class_diversity,
    density_coverage,
    evaluator_log_p,
    kept_count,
    on_class_diversity,
    realism_score,
    score_correlations,
    selective_statistics,
    stratified_curves,
)
from up.splits import load_image_split
from up.tokenizer import load_tokenizer
from up.tokens import load_token_split, predict
from up.transformer import load_var_and_temperatures
from up.uncertainty import image_scores

EVALUATOR, TOKENIZER = paths.EVALUATOR, paths.TOKENIZER


def calibration(params: Params, variant: str, seed: int, device: torch.device
                ) -> tuple[dict, list[dict]]:
    """ECE, NLL, Brier, top-1 accuracy and reliability bins of the token predictions
    on every val token (true labels, no guidance), accumulated batch by batch."""
    tokenizer = load_tokenizer(TOKENIZER, device)
    var, temperatures = load_var_and_temperatures(paths.model(variant, seed))
    var = var.to(device)
    val = load_token_split(paths.split(paths.TOKENS, "val"), tokenizer, device)
    meter = CalibrationMeter(params.evaluate.ece_bins)
    for logits, targets in predict(var, val, torch.arange(len(val)), params.train.batch_size,
                                   params.train.bf16, temperatures):
        meter.update(logits, targets)
    calib = meter.compute()
    figures = {"ece": calib["ece"], "nll": calib["nll"], "brier": calib["brier"],
               "token_accuracy": calib["accuracy"], "n_val_images": len(val),
               "n_val_tokens": meter.count}
    return figures, meter.bins()


def run(params: Params, variant: str, seed: int) -> None:
    ev = params.evaluate
    params.variant(variant)
    device = resolve_device(params.device)
    name = paths.run_tag(variant, seed)
    plots = paths.eval_plots(variant, seed)

    samples = load_torch(paths.samples(variant, seed) / "samples.pt", "samples")
    test = vars(load_image_split(paths.PREPARED, "test"))  # TODO(lead): attribute access
    gen, labels, real = samples["images"], samples["labels"], test["images"]
    smallest = kept_count(len(gen), min(ev.selective_fractions))
    if smallest <= ev.pr_neighborhood:
        raise StageError(f"selective generation keeps {smallest} of {len(gen)} samples at fraction "
                         f"{min(ev.selective_fractions)}; precision/recall needs more than "
                         f"evaluate.pr_neighborhood={ev.pr_neighborhood} (raise sample.n_per_class)")
    config = config_from_params(ev, str(EVALUATOR), device.type == "cuda", seed)
    quality = compute_quality(gen, real, config)

    evaluator = load_evaluator(EVALUATOR).to(device)
    gen_features, gen_logits = evaluator_outputs(evaluator, gen, device=device)
    real_features, real_logits = evaluator_outputs(evaluator, real, device=device)
    real_labels = test["labels"]
    # unconditional samples have no label: group them by the evaluator's class
    gen_classes = torch.where(labels >= 0, labels, gen_logits.argmax(1))

    calib, bins = calibration(params, variant, seed, device)

    # per-sample quality, independent of the rest of the set
    log_p = evaluator_log_p(gen_logits, gen_classes)
    realism = realism_score(gen_features, gen_classes, real_features, real_labels,
                            ev.pr_neighborhood)
    failed = (gen_logits.argmax(1) != gen_classes) | (realism < ev.realism_threshold)
    neg_log_realism = -realism.clamp_min(1e-12).log()
    scores = image_scores(samples["uncertainty"]["maps"], ev.fine_scales)
    stats, curves = selective_statistics(
        scores, gen_classes, failed,
        risks={"failure": failed.double(), "nll": -log_p, "neg_log_realism": neg_log_realism},
        qualities={"log_p": log_p, "realism": realism}, repeats=ev.bootstrap, seed=seed)
    correlations = score_correlations(scores, gen_classes)

    gen_fid = extract_features(gen, config)
    real_fid = extract_features(real, config)
    subset_quality = SubsetQuality(real_fid, config)

    def metric(kept: torch.Tensor) -> dict:
        return {**subset_quality(gen_fid[kept]),
                "class_accuracy": class_accuracy(gen_logits[kept], labels[kept])}

    # subset FID only with per-class stratification, for the all-token scores (the _fine
    # ones would double its cost); 'oracle' ranks by -log p(y | x)
    whole = {sc: v for sc, v in scores.items() if not sc.endswith("_fine")}
    rows = stratified_curves({**whole, "oracle": -log_p}, gen_classes, ev.selective_fractions,
                             metric, ev.random_repeats, seed)
    smallest = min(ev.selective_fractions)
    selective = {f"selective_fid_{r['score']}": r["fid"] for r in rows if r["fraction"] == smallest}
    per_score = {}
    for row in stats:
        sc = row["score"]
        per_score.update({
            f"auroc_{sc}": row["auroc"], f"auroc_{sc}_lo": row["auroc_lo"],
            f"auroc_{sc}_hi": row["auroc_hi"], f"aurc_{sc}": row["aurc_failure"],
            f"aurc_gain_{sc}": row["aurc_gain_failure"],
            f"aurc_gain_{sc}_lo": row["aurc_gain_failure_lo"],
            f"aurc_gain_{sc}_hi": row["aurc_gain_failure_hi"],
            f"spearman_{sc}": row["spearman_log_p"], f"spearman_{sc}_lo": row["spearman_log_p_lo"],
            f"spearman_{sc}_hi": row["spearman_log_p_hi"]})

    figures = {
        **quality,
        **density_coverage(gen_fid, real_fid, ev.pr_neighborhood),
        "diversity": on_class_diversity(gen_features, gen_logits, gen_classes),
        "diversity_all": class_diversity(gen_features, gen_classes),
        "diversity_real": on_class_diversity(real_features, real_logits, real_labels),
        "class_accuracy": class_accuracy(gen_logits, labels),
        **calib,
        "failure_rate": failed.double().mean().item(),
        "log_p_mean": log_p.mean().item(),
        "realism_median": realism.median().item(),
        "aurc_random": stats[0]["aurc_failure_random"],
        "aurc_oracle": stats[0]["aurc_failure_oracle"],
        **per_score,
        "selective_fraction": smallest,
        **selective,
        "n_samples": len(gen),
        "n_real": len(real),
        "n_bootstrap": ev.bootstrap,
        "seed": seed,
        "sample_seed": int(samples["seed"]),
        "feature_extractor": ev.feature_extractor,
    }
    per_sample = [{"index": i, "label": int(labels[i]), "class": int(gen_classes[i]),
                   "predicted": int(gen_logits[i].argmax()), "log_p": float(log_p[i]),
                   "realism": float(realism[i]), "failed": bool(failed[i]),
                   **{sc: float(v[i]) for sc, v in scores.items()}} for i in range(len(gen))]
    save_json(figures, paths.metrics(f"eval-{name}"))
    save_json(bins, plots / "reliability.json")
    save_json(rows, plots / "selective.json")
    save_json(curves, plots / "risk_coverage.json")
    save_json(stats, plots / "selective_stats.json")
    save_json([{"score_a": a, "score_b": b, "spearman": correlations["spearman"][i][j]}
               for i, a in enumerate(correlations["scores"])
               for j, b in enumerate(correlations["scores"])], plots / "score_correlation.json")
    save_json(per_sample, plots / "per_sample.json")
    label = f"{name} (N={len(gen)} vs {len(real)} test)"
    save_figure(reliability_figure({f"{name} ({calib['n_val_tokens']} val tokens)": bins}),
                plots / "reliability.png")
    save_figure(selective_figure({label: rows}), plots / "selective.png")
    save_figure(risk_coverage_figure({label: curves}), plots / "risk_coverage.png")
    save_figure(correlation_figure(correlations, name), plots / "score_correlation.png")
    print(f"evaluate {name}: FID {quality['fid']:.4g}, precision {quality['precision']:.3f}, "
          f"recall {quality['recall']:.3f}, ECE {calib['ece']:.4f}, failed "
          f"{figures['failure_rate']:.3f}, AUROC(entropy) {figures.get('auroc_entropy') or 0:.3f} "
          f"(N={len(gen)})")
