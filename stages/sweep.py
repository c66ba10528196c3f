"""sweep@variant: the run's quality-diversity curve over the guidance scale.

For every value of ``sweep.guidance`` the run's model samples
``sweep.n_per_class`` images per class (the other sampling settings, and the
model's per-scale temperatures, as in the sample stage) and they are scored at
once: FID, precision and recall against the test split (the feature network of
``evaluate.feature_extractor``), class accuracy and within-class diversity
(the evaluator's features, over the images it assigns to their class). The
images are not kept. Every guidance value draws from the same sampling seed
(the run's training seed, as the sample stage): common random numbers across
guidance values and across variants of one seed, so curve differences are not
sampling noise of different draws.

Output: metrics/sweep-{variant}-s{seed}.json, one row per guidance value.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from up.config import Params
from up.errors import StageError
from up.evaluator import evaluator_outputs, load_evaluator
from up.fidelity import SubsetQuality, config_from_params, extract_features
from up.frontier import sweep_path
from up.io import save_json
from up.paths import EVALUATOR, PREPARED, TOKENIZER, model, run_tag
from up.runtime import resolve_device
from up.sampling import sample_many
from up.selective import class_accuracy, on_class_diversity
from up.splits import load_image_split
from up.tokenizer import load_code_clusters, load_tokenizer
from up.transformer import load_var_and_temperatures


def run(params: Params, variant: str, seed: int) -> None:
    sw, sp, ev = params.sweep, params.sample, params.evaluate
    kappa = float(getattr(params.variant(variant), "kappa", 1.0))
    device = resolve_device(params.device)
    tag = run_tag(variant, seed)
    checkpoint = model(variant, seed)

    tokenizer = load_tokenizer(TOKENIZER, device)
    code_to_cluster, num_clusters = load_code_clusters(TOKENIZER)
    var, scale_temperatures = load_var_and_temperatures(checkpoint, ema=True)
    var = var.to(device)
    labels = torch.arange(var.num_classes).repeat_interleave(sw.n_per_class)
    if len(labels) <= ev.pr_neighborhood:
        raise StageError(f"{len(labels)} samples per guidance value; precision/recall needs more "
                         f"than evaluate.pr_neighborhood={ev.pr_neighborhood} (raise sweep.n_per_class)")

    test = vars(load_image_split(PREPARED, "test"))  # TODO(lead): attribute access
    config = config_from_params(ev, str(EVALUATOR), device.type == "cuda", seed)
    quality = SubsetQuality(extract_features(test["images"], config), config)
    evaluator = load_evaluator(EVALUATOR).to(device)

    bf16 = device.type == "cuda" and params.train.bf16
    kwargs = dict(guidance_schedule=sp.guidance_schedule, top_k=sp.top_k, top_p=sp.top_p,
                  temperature=sp.temperature, scale_temperatures=scale_temperatures,
                  code_to_cluster=code_to_cluster, num_clusters=num_clusters, kappa=kappa)
    rows = []
    for guidance in sorted(sw.guidance):
        start = time.perf_counter()
        # the run's seed at every guidance: common random numbers along the curve
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext():
            images = sample_many(var, tokenizer, labels, sp.batch_size, generator,
                                 f"sweep {tag} guidance {guidance:g}", guidance=guidance,
                                 **kwargs)["images"]
        features, logits = evaluator_outputs(evaluator, images, device=device)
        diversity = on_class_diversity(features, logits, labels)
        n_in_class = int((logits.argmax(1) == labels).sum())
        rows.append({"guidance": guidance, **quality(extract_features(images, config)),
                     "class_accuracy": class_accuracy(logits, labels), "diversity": diversity,
                     "n_samples": len(images), "n_in_class": n_in_class,
                     "sample_seed": seed})
        r = rows[-1]
        shown = "n/a" if diversity is None else f"{diversity:.3f}"
        print(f"sweep {tag} guidance {guidance:g}: FID {r['fid']:.4g}, precision {r['precision']:.3f}, "
              f"recall {r['recall']:.3f}, class acc {r['class_accuracy']:.3f}, diversity {shown} "
              f"(N={len(images)}, {time.perf_counter() - start:.1f} s)")

    save_json({"variant": variant, "seed": seed, "n_per_class": sw.n_per_class,
               "n_real": len(test["images"]), "feature_extractor": ev.feature_extractor,
               "guidance_schedule": sp.guidance_schedule, "temperature": sp.temperature,
               "top_k": sp.top_k, "top_p": sp.top_p, "device": str(device), "bf16": bf16,
               "scale_temperatures": None if scale_temperatures is None
               else scale_temperatures.tolist(), "rows": rows},
              sweep_path(variant, seed))
