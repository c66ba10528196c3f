"""What editing is measured by (the edit@ stage; docs/method.md §6).

Per edit task (a mask, and the image's own class or a shifted one) every source image
gets K fills. The measures: the evaluator's accuracy for the requested class; realism
against the real training images of that class (the evaluate stage's realism score);
the PSNR of the known region against the original (how far the decoder and the
partly masked coarse cells carry the fill across the boundary), beside the tokenizer's
own reconstruction PSNR over the same pixels; the diversity of the K fills (mean
pairwise evaluator-feature distance); for out-painting, repetition (the generated
half's feature similarity to the known half, or to its mirror image, whichever is
larger) beside the same figure of the real image; and whether the uncertainty map
predicts where the K fills disagree (per image: Spearman between the map and the
fills' pixel variance over the masked locations, and the AUROC of the map for the
top-decile disagreement locations; bootstrap intervals over images; the same with the
map shuffled within each image's masked region as the control, ≈ 0 and ≈ 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from up.evaluation.metrics import Metric
from up.evaluation.selective import realism_score

# The columns of the report's editing table. Repetition, diversity and the reference
# figures have no arrow: repetition is read against the real images' value, diversity
# against quality, the reconstruction PSNR and the shuffled controls are references.
METRICS = (
    Metric("edit_class_accuracy", "class acc", "higher", main=True, paired=True,
           name="class accuracy of in-/out-painted images"),
    Metric("edit_class_edit_accuracy", "class-edit acc", "higher", main=True, paired=True,
           name="class accuracy of class-edited images (requested class)"),
    Metric("edit_realism_median", "realism", "higher", main=True, paired=True,
           name="median realism of the edited images"),
    Metric("edit_known_psnr", "known PSNR", "higher", main=True, paired=True,
           name="PSNR of the known region (dB)"),
    Metric("edit_recon_psnr", "recon PSNR", main=True,
           name="the tokenizer's reconstruction PSNR over the known region (dB)"),
    Metric("edit_diversity", "fill diversity", main=True, paired=True,
           name="mean pairwise feature distance of the K fills"),
    Metric("edit_repetition", "repetition", "lower", main=True, paired=True,
           name="out-painting repetition"),
    Metric("edit_repetition_real", "repetition (real)", main=True,
           name="repetition of the real images"),
    Metric("edit_spearman", "Spearman", "higher", main=True, paired=True,
           name="Spearman between the uncertainty map and the fills' disagreement"),
    Metric("edit_spearman_shuffled", "Spearman shuffled", main=True,
           name="Spearman of the shuffled map"),
    Metric("edit_auroc", "AUROC", "higher", main=True, paired=True,
           name="AUROC of the map for the top-decile disagreement"),
    Metric("edit_auroc_shuffled", "AUROC shuffled", main=True, name="AUROC of the shuffled map"),
    *(Metric(f"edit_{m}_{end}", f"{m} {end}", summary=True)
      for m in ("spearman", "auroc") for end in ("lo", "hi")),
)
# The per-image figures a task yields (``score_task``), pooled over tasks by ``figures``.
UNIT_KEYS = ("accuracy", "known_psnr", "recon_psnr", "diversity", "repetition",
             "repetition_real", "spearman", "auroc", "spearman_shuffled", "auroc_shuffled")
TOP_FRACTION = 0.1  # the disagreement locations the AUROC detects: the top decile
PSNR_FLOOR_MSE = 1e-10  # identical regions: a finite 148 dB, not infinity

Features = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (features, logits)


def psnr(images: torch.Tensor, originals: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of uint8 ``images`` (N, C, H, W) against ``originals`` over the pixels
    where ``keep`` (N, H, W) is True (every channel): 10 log10(255^2 / MSE)."""
    diff = (images.double() - originals.double()).square().mean(1)
    weight = keep.double()
    mse = (diff * weight).sum((1, 2)) / weight.sum((1, 2)).clamp_min(1)
    return 10 * torch.log10(255.0 ** 2 / mse.clamp_min(PSNR_FLOOR_MSE))


def fill_diversity(features: torch.Tensor) -> torch.Tensor:
    """Mean pairwise Euclidean distance among the K fills' features (N, K, D) -> (N,)."""
    return torch.stack([torch.pdist(f.double()).mean() for f in features])


def halves(images: torch.Tensor, half: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(generated half, known half, the axis across the boundary) of images out-painted
    with the half mask ``half`` (left_half, right_half, top or bottom)."""
    axis = -1 if half in ("left_half", "right_half") else -2
    n = images.shape[axis] // 2
    first, second = images.narrow(axis, 0, n), images.narrow(axis, n, images.shape[axis] - n)
    generated, known = (first, second) if half in ("left_half", "top") else (second, first)
    return generated, known, axis


def repetition(images: torch.Tensor, half: str, features: Features) -> torch.Tensor:
    """Per image (N,): the larger cosine similarity of the evaluator features of the
    generated half with those of the known half as it lies (a copy) or mirrored across
    the boundary (a reflection)."""
    generated, known, axis = halves(images, half)
    g = features(generated)[0]
    return torch.stack([F.cosine_similarity(g, features(k)[0], dim=1, eps=1e-12)
                        for k in (known, known.flip(axis))]).amax(0)


def disagreement(fills: torch.Tensor, side: int) -> torch.Tensor:
    """Where the K fills (N, K, C, H, W) disagree: the per-pixel variance across the
    fills (mean over channels), averaged over each cell of the side x side map."""
    var = fills.double().var(1, unbiased=False).mean(1)
    return F.adaptive_avg_pool2d(var[:, None], side)[:, 0]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation; NaN when either is constant."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    ra, rb = rankdata(a) - (len(a) + 1) / 2, rankdata(b) - (len(b) + 1) / 2
    return float((ra * rb).sum() / math.sqrt((ra * ra).sum() * (rb * rb).sum()))


def _auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties half (Mann-Whitney); NaN
    without both classes."""
    p, n = int(positive.sum()), int((~positive).sum())
    if not p or not n:
        return math.nan
    ranks = rankdata(score)
    return float((ranks[positive].sum() - p * (p + 1) / 2) / (p * n))


def map_agreement(maps: torch.Tensor, disagree: torch.Tensor, region: torch.Tensor
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per image (N,): Spearman between the uncertainty ``maps`` (N, s, s) and the
    fills' ``disagree``ment over the locations of ``region`` (the masked cells), and the
    AUROC of the map for the locations whose disagreement is in the top decile of the
    region (>= its 90th percentile). NaN where undefined (constant values)."""
    rhos, aurocs = [], []
    for u, d, r in zip(maps.numpy(), disagree.numpy(), region.numpy(), strict=True):
        u, d = u[r].astype(np.float64), d[r]
        rhos.append(_spearman(u, d))
        aurocs.append(_auroc(u, d >= np.quantile(d, 1 - TOP_FRACTION)) if len(d) else math.nan)
    return np.array(rhos), np.array(aurocs)


def shuffled(maps: torch.Tensor, region: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The control map: each image's map values permuted among its region's locations."""
    out = maps.clone()
    for i in range(len(maps)):
        values = out[i][region[i]]
        out[i][region[i]] = values[torch.from_numpy(rng.permutation(len(values)))]
    return out


@dataclass
class TaskInputs:
    """One edit task's images, N source images with K fills each."""

    half: str | None  # out-painting: the masked half (left_half, right_half, top, bottom)
    fills: torch.Tensor  # uint8 (N, K, C, H, W)
    originals: torch.Tensor  # uint8 (N, C, H, W)
    reconstructions: torch.Tensor  # uint8 (N, C, H, W): the tokenizer's
    masks: torch.Tensor  # bool (N, H, W), True = filled
    requested: torch.Tensor  # (N,) the class each fill was asked for
    maps: torch.Tensor  # (N, K, s, s) the fills' uncertainty maps (NaN outside the region)
    region: torch.Tensor  # bool (N, s, s): the map's sampled (masked) locations


def score_task(task: TaskInputs, features: Features, real: tuple[torch.Tensor, torch.Tensor],
               realism_k: int, repeats: int, seed: int) -> dict[str, np.ndarray]:
    """The per-image figures of one task (UNIT_KEYS, each (N,); NaN where undefined)
    and every fill's realism (``realism``, (N * K,)) against the ``real`` (features,
    labels) of the requested class. The shuffled-map control is the mean over
    ``repeats`` permutations (drawn with ``seed``)."""
    N, K = task.fills.shape[:2]
    flat = task.fills.flatten(0, 1)
    feats, logits = features(flat)
    requested = task.requested.repeat_interleave(K)
    keep = ~task.masks
    known = psnr(flat, task.originals.repeat_interleave(K, 0), keep.repeat_interleave(K, 0))
    out = {
        "accuracy": (logits.argmax(1) == requested).double().view(N, K).mean(1).numpy(),
        "realism": realism_score(feats, requested, *real, realism_k).numpy(),
        "known_psnr": known.view(N, K).mean(1).numpy(),
        "recon_psnr": psnr(task.reconstructions, task.originals, keep).numpy(),
        "diversity": fill_diversity(feats.view(N, K, -1)).numpy(),
    }
    if task.half is not None:
        out["repetition"] = repetition(flat, task.half, features).view(N, K).mean(1).numpy()
        out["repetition_real"] = repetition(task.originals, task.half, features).numpy()
    else:
        out["repetition"] = out["repetition_real"] = np.full(N, math.nan)
    side = task.maps.shape[-1]
    maps, disagree = task.maps.nanmean(1), disagreement(task.fills, side)
    out["spearman"], out["auroc"] = map_agreement(maps, disagree, task.region)
    rng = np.random.default_rng(seed)
    controls = [map_agreement(shuffled(maps, task.region, rng), disagree, task.region)
                for _ in range(repeats)]
    out["spearman_shuffled"], out["auroc_shuffled"] = (
        np.stack(values).mean(0) for values in zip(*controls, strict=True))
    return out


def _mean(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else None


def bootstrap_interval(values: np.ndarray, repeats: int, seed: int
                       ) -> tuple[float | None, float | None]:
    """95 % percentile interval of the mean of the finite ``values`` (units resampled
    with replacement ``repeats`` times); None without a finite value."""
    values = values[np.isfinite(values)]
    if not len(values):
        return None, None
    draws = np.random.default_rng(seed).integers(0, len(values), (repeats, len(values)))
    low, high = np.percentile(values[draws].mean(1), [2.5, 97.5])
    return float(low), float(high)


def task_figures(units: dict[str, np.ndarray]) -> dict[str, float | None]:
    """One task's (or tasks' pooled) means of the per-image figures and median realism."""
    return {**{key: _mean(units[key]) for key in UNIT_KEYS},
            "realism_median": float(np.median(units["realism"]))}


def figures(tasks: dict[str, dict[str, np.ndarray]], class_edits: Sequence[str], repeats: int,
            seed: int) -> dict[str, float | None]:
    """The metric keys (METRICS) of a run from its tasks' ``score_task`` rows:
    ``class_edits`` names the tasks that asked for another class (their accuracy is the
    class-edit accuracy); every other figure pools all tasks (repetition: the half
    masks'); Spearman and AUROC with bootstrap intervals over the pooled images."""
    def pool(names: Sequence[str], key: str) -> np.ndarray:
        return np.concatenate([tasks[n][key] for n in names]) if names else np.array([])

    names = list(tasks)
    own = [n for n in names if n not in class_edits]
    out: dict[str, float | None] = {
        "edit_class_accuracy": _mean(pool(own, "accuracy")),
        "edit_class_edit_accuracy": _mean(pool(list(class_edits), "accuracy")),
        "edit_realism_median": float(np.median(pool(names, "realism"))),
    }
    for key in ("known_psnr", "recon_psnr", "diversity", "repetition", "repetition_real",
                "spearman", "spearman_shuffled", "auroc", "auroc_shuffled"):
        out[f"edit_{key}"] = _mean(pool(names, key))
    for key in ("spearman", "auroc"):
        out[f"edit_{key}_lo"], out[f"edit_{key}_hi"] = bootstrap_interval(
            pool(names, key), repeats, seed)
    return out


def figure(runs: dict[str, dict[int, dict]]):
    """results/editing.png: per variant, Spearman and AUROC of the uncertainty map for
    where the fills disagree (mean over seeds; bars: the first seed's bootstrap 95 %
    interval), beside the shuffled-map control (hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, axes = plt.subplots(1, 2, figsize=(2.0 + 0.7 * len(names), 3.0), layout="constrained")
    for ax, key, chance in zip(axes, ("spearman", "auroc"), (0.0, 0.5), strict=True):
        for x, name in enumerate(names):
            by_seed = [runs[name][s] for s in sorted(runs[name])]
            values = [r[f"edit_{key}"] for r in by_seed if r[f"edit_{key}"] is not None]
            control = [r[f"edit_{key}_shuffled"] for r in by_seed
                       if r[f"edit_{key}_shuffled"] is not None]
            first = by_seed[0]
            if values:
                mean = float(np.mean(values))
                low, high = first[f"edit_{key}_lo"], first[f"edit_{key}_hi"]
                err = None if low is None else [[mean - min(low, mean)], [max(high, mean) - mean]]
                ax.errorbar([x], [mean], yerr=err, fmt="o", color="C0", capsize=3,
                            label="map" if x == 0 else None)
            if control:
                ax.plot([x], [float(np.mean(control))], "o", mfc="none", color="gray",
                        label="shuffled map" if x == 0 else None)
        ax.axhline(chance, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title({"spearman": "Spearman(uncertainty, disagreement)",
                      "auroc": "AUROC, top-decile disagreement"}[key], fontsize=8)
    axes[0].legend(fontsize=7)
    return fig
