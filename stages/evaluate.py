"""evaluate@variant: quality, diversity, calibration and selective generation of one run.

Generated images (samples/{variant}-s{seed}) are compared with the test split;
token calibration is measured on the val tokens with the run's transformer.
Outputs: metrics/eval-{variant}-s{seed}.json (flat main figures, with sample
counts and seeds) and plots/eval/{variant}-s{seed}/ (reliability and selective
generation as JSON rows and PNGs).
"""

from __future__ import annotations

from pathlib import Path

import torch

from up.calibration import CalibrationMeter
from up.config import Params
from up.errors import StageError
from up.evaluator import evaluator_outputs, load_evaluator
from up.fidelity import FidelityConfig, SubsetQuality, compute_quality, extract_features
from up.io import load_torch, save_figure, save_json
from up.report import reliability_figure, selective_figure
from up.runtime import resolve_device
from up.selective import class_accuracy, class_diversity, kept_count, selective_curves
from up.tokenizer import load_tokenizer
from up.tokens import load_token_split, predict
from up.transformer import load_var_and_temperatures

EVALUATOR = Path("models/evaluator.pt")
TOKENIZER = Path("models/tokenizer.pt")


def fidelity_config(params: Params, device: torch.device, seed: int) -> FidelityConfig:
    ev = params.evaluate
    weights = str(EVALUATOR) if ev.feature_extractor == "evaluator" else ev.inception_weights
    return FidelityConfig(extractor=ev.feature_extractor, weights_path=weights,
                          cuda=device.type == "cuda", kid_subset_size=ev.kid_subset_size,
                          kid_subsets=ev.kid_subsets, pr_neighborhood=ev.pr_neighborhood, seed=seed)


def calibration(params: Params, variant: str, seed: int, device: torch.device
                ) -> tuple[dict, list[dict]]:
    """ECE, NLL, Brier, top-1 accuracy and reliability bins of the token predictions
    on every val token (true labels, no guidance), accumulated batch by batch."""
    tokenizer = load_tokenizer(TOKENIZER, device)
    var, temperatures = load_var_and_temperatures(Path("models") / f"var-{variant}-s{seed}.pt")
    var = var.to(device)
    val = load_token_split("data/tokens/val.pt", tokenizer, device)
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
    name = f"{variant}-s{seed}"
    plots = Path("plots/eval") / name

    samples = load_torch(Path("samples") / name / "samples.pt", "samples")
    test = load_torch("data/prepared/test.pt", "prepared test split")
    gen, labels, real = samples["images"], samples["labels"], test["images"]
    smallest = kept_count(len(gen), min(ev.selective_fractions))
    if smallest <= ev.pr_neighborhood:
        raise StageError(f"selective generation keeps {smallest} of {len(gen)} samples at fraction "
                         f"{min(ev.selective_fractions)}; precision/recall needs more than "
                         f"evaluate.pr_neighborhood={ev.pr_neighborhood} (raise sample.n_per_class)")
    config = fidelity_config(params, device, seed)
    quality = compute_quality(gen, real, config)

    evaluator = load_evaluator(EVALUATOR).to(device)
    gen_features, gen_logits = evaluator_outputs(evaluator, gen, device=device)
    real_features, _ = evaluator_outputs(evaluator, real, device=device)
    # unconditional samples have no label: group them by the evaluator's class
    gen_classes = torch.where(labels >= 0, labels, gen_logits.argmax(1))

    calib, bins = calibration(params, variant, seed, device)

    gen_fid = extract_features(gen, config)
    subset_quality = SubsetQuality(extract_features(real, config), config)

    def metric(kept: torch.Tensor) -> dict:
        return {**subset_quality(gen_fid[kept]),
                "class_accuracy": class_accuracy(gen_logits[kept], labels[kept])}

    rows = selective_curves(samples["uncertainty"]["image"], ev.selective_fractions, metric,
                            ev.random_repeats, seed)
    smallest = min(ev.selective_fractions)
    selective = {f"selective_fid_{r['score']}": r["fid"] for r in rows if r["fraction"] == smallest}

    figures = {
        **quality,
        "diversity": class_diversity(gen_features, gen_classes),
        "diversity_real": class_diversity(real_features, test["labels"]),
        "class_accuracy": class_accuracy(gen_logits, labels),
        **calib,
        "selective_fraction": smallest,
        **selective,
        "n_samples": len(gen),
        "n_real": len(real),
        "seed": seed,
        "sample_seed": int(samples["seed"]),
        "feature_extractor": ev.feature_extractor,
    }
    save_json(figures, Path("metrics") / f"eval-{name}.json")
    save_json(bins, plots / "reliability.json")
    save_json(rows, plots / "selective.json")
    label = f"{name} (N={len(gen)} vs {len(real)} test)"
    save_figure(reliability_figure({f"{name} ({calib['n_val_tokens']} val tokens)": bins}),
                plots / "reliability.png")
    save_figure(selective_figure({label: rows}), plots / "selective.png")
    print(f"evaluate {name}: FID {quality['fid']:.4g}, precision {quality['precision']:.3f}, "
          f"recall {quality['recall']:.3f}, ECE {calib['ece']:.4f} (N={len(gen)})")
