"""Selective generation and diversity.

A useful uncertainty score ranks generated images so that dropping the most
uncertain ones improves quality more than dropping the same number at random.
The bookkeeping (which images survive at each kept fraction, the random-drop
control) is kept apart from the metric, which is passed in, so the ranking
direction and the kept counts can be checked on examples with a known answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.stats import rankdata

from up.evaluation.metrics import Metric, Table
from up.generation.scores import ALL_MEASURES, IMAGE_SCORES, aggregate

SubsetMetric = Callable[[torch.Tensor], dict[str, float | None]]
# The tails where the failure rate is read (risk at the extremes): the most and the least
# certain 5 % and 10 % of every class. AUROC averages over the whole ranking; a score can
# sit near 0.5 while its most certain images fail far more often than the rest.
EXTREME_FRACTIONS = (0.05, 0.10)

# -- the declared metrics (up.evaluation.metrics): set_figures and selective_figures -------
#
# Diversity and density have no arrow: both depend on how sharp the samples are (the
# frontier compares diversity at matched quality), and density is 1 for real-like samples.
# The tables rank by the per-image scores of up.generation.scores (IMAGE_SCORES); the
# controls 'random' and 'oracle' are columns of their own.
AUROC = Table(
    "Within-class AUROC for failed samples ↑",
    "Probability that a failed sample (misclassified by the evaluator, or realism below the "
    "threshold) has a higher score than a good sample of the same class; 0.5 = chance.")
AURC_GAIN = Table(
    "AURC gain over random ↑ (failure risk)",
    "(AURC_random − AURC_score) / (AURC_random − AURC_oracle) of the within-class "
    "risk-coverage curve of the failure rate: 0 = no better than dropping at random, "
    "1 = as good as ranking by the failure itself. `random`/`oracle`: their AURC.")
LABEL = Table(
    "The failure label",
    "A sample fails when the evaluator assigns it another class or its realism against the "
    "real training images of its class is below the threshold; `misclassified` and "
    "`unreal`: the fraction failing for each reason. Split-half: each class's real images "
    "split in two halves at random, the label computed against each; the fraction of "
    "samples labelled alike and Cohen's κ. An AUROC near 0.5 counts against a score only "
    "when the label agrees with itself.")


def _tag(fraction: float) -> str:
    """A tail fraction as it appears in a key: 0.05 -> '5'."""
    return f"{fraction * 100:g}"


def _extreme_table(certain: bool, fraction: float) -> Table:
    side = "most" if certain else "least"
    return Table(
        f"Failure rate of the {side} certain {fraction:.0%} of every class "
        + ("↓" if certain else "↑"),
        f"Fraction of failed samples among the {side} certain {fraction:.0%} of every class "
        "by each score (stratified bootstrap 95 % interval); compare with the base "
        "`failure rate` of the failure-label table. "
        + ("Above it: the score's most certain samples are worse than average, a reversed "
           "signal that an AUROC near 0.5 can hide." if certain else
           "Above it: the score's least certain samples are the bad ones."))


EXTREMES = {(certain, fr): _extreme_table(certain, fr)
            for fr in EXTREME_FRACTIONS for certain in (True, False)}
SPEARMAN = Table(
    "Within-class Spearman correlation with log p(y | x)",
    "Mean over classes of the rank correlation between the score and the evaluator's "
    "log-probability of the conditioned class; negative = uncertain samples are worse.")
SUBSET_FID = Table(
    "Stratified subset FID ↓: most certain {fraction:.0%} of every class",
    "FID of the most certain fraction of every class; `random`: stratified random subsets "
    "of the same per-class sizes; `oracle`: ranked by −log p(y | x). Lower than `random` "
    "means the score removes bad samples, but FID also penalises lost diversity.")
METRICS = (
    Metric("diversity", "diversity", main=True, paired=True, headline=True, curve=True,
           name="within-class diversity"),
    Metric("density", "density", main=True),
    Metric("coverage", "coverage", "higher", main=True),
    Metric("class_accuracy", "class acc", "higher", main=True, paired=True, headline=True,
           curve=True, name="class accuracy"),
    *(Metric(f"auroc_{s}", s, "higher", table=AUROC, interval=True) for s in IMAGE_SCORES),
    Metric("failure_rate", "failure rate", table=LABEL, interval=True),
    Metric("failure_misclassified", "misclassified", table=LABEL),
    Metric("failure_unreal", "unreal", table=LABEL),
    Metric("label_agreement", "split-half agreement", "higher", table=LABEL),
    Metric("label_kappa", "split-half κ", "higher", table=LABEL),
    *(Metric(f"failure_{'' if certain else 'un'}certain{_tag(fr)}_{s}", s,
             "lower" if certain else "higher", table=table, interval=True)
      for (certain, fr), table in EXTREMES.items() for s in IMAGE_SCORES),
    *(Metric(f"aurc_gain_{s}", s, "higher", table=AURC_GAIN, interval=True) for s in IMAGE_SCORES),
    Metric("aurc_random", "AURC random", "lower", table=AURC_GAIN),
    Metric("aurc_oracle", "AURC oracle", "lower", table=AURC_GAIN),
    *(Metric(f"spearman_{s}", s, table=SPEARMAN, interval=True) for s in IMAGE_SCORES),
    *(Metric(f"selective_fid_{s}", s, "lower", table=SUBSET_FID)
      for s in (*ALL_MEASURES, "random", "oracle")),
)


def kept_count(n: int, fraction: float) -> int:
    """round(fraction * n), at least 1: the same count for every score and the control."""
    if not 0 < fraction <= 1:
        raise ValueError(f"kept fraction must be in (0, 1], got {fraction}")
    return max(1, min(n, round(fraction * n)))


def most_certain(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ``fraction`` of images with the lowest uncertainty score
    (ties: lower index first), most certain first."""
    order = torch.argsort(scores, stable=True)
    return order[:kept_count(len(scores), fraction)]


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)


def class_diversity(features: torch.Tensor, classes: torch.Tensor) -> float:
    """Mean pairwise Euclidean feature distance within each class, averaged over the
    classes with at least two images: low when a model collapses inside a class."""
    per_class = []
    for cls in torch.unique(classes).tolist():
        members = features[classes == cls].double()
        if len(members) >= 2:
            per_class.append(torch.pdist(members).mean().item())
    if not per_class:
        raise ValueError("diversity needs a class with at least two images")
    return sum(per_class) / len(per_class)


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Fraction of conditioned images (label >= 0) the evaluator assigns to their class;
    None when no image was conditioned."""
    conditioned = labels >= 0
    if not conditioned.any():
        return None
    return (logits[conditioned].argmax(1) == labels[conditioned]).double().mean().item()


# -- per-sample quality ---------------------------------------------------------

def _kth_neighbour_radius(features: torch.Tensor, k: int, chunk: int = 512) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row (self excluded)."""
    if len(features) <= k:
        raise ValueError(f"the k-NN radius needs more than k={k} real images, got {len(features)}")
    out = []
    for start in range(0, len(features), chunk):
        d = torch.cdist(features[start:start + chunk], features)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the first is the row itself (0)
    return torch.cat(out)


def realism_score(gen: torch.Tensor, gen_classes: torch.Tensor, real: torch.Tensor,
                  real_classes: torch.Tensor, k: int, chunk: int = 512) -> torch.Tensor:
    """Realism score (Kynkäänniemi et al. 2019) of every generated feature against the
    real features of its class: max_r radius_k(r) / ||f - r|| over the real r of the
    class, radius_k(r) the distance from r to its k-th nearest real neighbour of the
    class. >= 1 iff f lies inside some real sample's k-NN ball (the precision
    criterion); a class without more than k real images raises."""
    gen, real = gen.double(), real.double()
    out = torch.empty(len(gen), dtype=torch.float64)
    for cls in torch.unique(gen_classes).tolist():
        members = real[real_classes == cls]
        radius = _kth_neighbour_radius(members, k)
        where = torch.nonzero(gen_classes == cls).flatten()
        for start in range(0, len(where), chunk):
            idx = where[start:start + chunk]
            d = torch.cdist(gen[idx], members).clamp_min(1e-12)
            out[idx] = (radius[None] / d).max(1).values
    return out


def failure_label(predicted: torch.Tensor, classes: torch.Tensor, realism: torch.Tensor,
                  threshold: float) -> torch.Tensor:
    """A sample fails when the evaluator's ``predicted`` class is not its class or its
    realism is below ``threshold`` (docs/method.md §4)."""
    return (predicted != classes) | (realism < threshold)


def per_class_subset(classes: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of at most ``n`` images of every class drawn at random (seeded), sorted;
    n = 0 keeps every image."""
    if n == 0:
        return torch.arange(len(classes))
    gen = torch.Generator().manual_seed(seed)
    kept = [where[torch.randperm(len(where), generator=gen)[:n]]
            for where in (torch.nonzero(classes == c).flatten()
                          for c in torch.unique(classes).tolist())]
    return torch.cat(kept).sort().values


def split_halves(classes: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's images split in two at random (seeded): the indices of the first
    halves (floor(n_c / 2) of class c) and of the second halves, each sorted."""
    gen = torch.Generator().manual_seed(seed)
    first, second = [], []
    for cls in torch.unique(classes).tolist():
        where = torch.nonzero(classes == cls).flatten()
        where = where[torch.randperm(len(where), generator=gen)]
        first.append(where[:len(where) // 2])
        second.append(where[len(where) // 2:])
    return torch.cat(first).sort().values, torch.cat(second).sort().values


def label_agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float | int | None]:
    """Agreement of two binary labels of the same samples: the fraction labelled alike,
    Cohen's kappa (agreement - chance) / (1 - chance) with chance = p_a p_b + (1 - p_a)
    (1 - p_b) from each label's own rate (None when chance is 1: both labels constant
    and equal), and the number of samples."""
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"two labels of the same samples needed, got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.bool(), b.bool()
    agreement = (a == b).double().mean().item()
    pa, pb = a.double().mean().item(), b.double().mean().item()
    chance = pa * pb + (1 - pa) * (1 - pb)
    kappa = None if chance >= 1 else (agreement - chance) / (1 - chance)
    return {"agreement": agreement, "kappa": kappa, "n": len(a)}


def label_reliability(gen: torch.Tensor, predicted: torch.Tensor, gen_classes: torch.Tensor,
                      real: torch.Tensor, real_classes: torch.Tensor, k: int, threshold: float,
                      seed: int) -> dict[str, float | int | None]:
    """Split-half reliability of the failure label: every class's real features split in
    two halves (``split_halves``), the label of each generated feature computed against
    each half alone (realism with the same k, the evaluator's ``predicted`` class), and
    the two labels' ``label_agreement``. Each half holds half the real images, so its
    k-NN balls are wider and fewer than the whole set's: the figure bounds how much the
    label depends on which real images happen to be in the split."""
    labels = []
    for half in split_halves(real_classes, seed):
        realism = realism_score(gen, gen_classes, real[half], real_classes[half], k)
        labels.append(failure_label(predicted, gen_classes, realism, threshold))
    return label_agreement(*labels)


def failure_labels(gen: torch.Tensor, predicted: torch.Tensor, gen_classes: torch.Tensor,
                   real: torch.Tensor, real_classes: torch.Tensor, k: int, threshold: float,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, float | None]]:
    """The per-sample quality of the failure label and the label's own figures: every
    generated feature's realism against the real features of its class (k-NN radius
    ``k``), the failure flags (``failure_label``), and as metric keys the fraction
    misclassified, the fraction below the realism ``threshold`` and the split-half
    ``label_agreement`` and ``label_kappa`` (``label_reliability``, halves drawn with
    ``seed``). Returns (realism, failed, figures)."""
    realism = realism_score(gen, gen_classes, real, real_classes, k)
    failed = failure_label(predicted, gen_classes, realism, threshold)
    reliability = label_reliability(gen, predicted, gen_classes, real, real_classes, k, threshold,
                                    seed)
    return realism, failed, {
        "failure_misclassified": (predicted != gen_classes).double().mean().item(),
        "failure_unreal": (realism < threshold).double().mean().item(),
        "label_agreement": reliability["agreement"],
        "label_kappa": reliability["kappa"],
    }


def density_coverage(gen: torch.Tensor, real: torch.Tensor, k: int, chunk: int = 512
                     ) -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020) with k-NN balls around the real
    features: density = sum over generated f of the number of real balls holding f,
    over k * N_gen (1 on average for samples drawn like the real set, above 1 where
    samples crowd dense regions); coverage = fraction of real balls that hold at least
    one generated sample (a diversity figure that outliers cannot inflate)."""
    gen, real = gen.double(), real.double()
    radius = _kth_neighbour_radius(real, k, chunk)
    inside_count, covered = 0, torch.zeros(len(real), dtype=torch.bool)
    for start in range(0, len(gen), chunk):
        inside = torch.cdist(gen[start:start + chunk], real) <= radius[None]
        inside_count += int(inside.sum())
        covered |= inside.any(0)
    return {"density": inside_count / (k * len(gen)), "coverage": covered.double().mean().item()}


def evaluator_log_p(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """log p(class | x) of the evaluator, per image."""
    return torch.log_softmax(logits.double(), 1).gather(1, classes[:, None]).squeeze(1)


def on_class_diversity(features: torch.Tensor, logits: torch.Tensor, classes: torch.Tensor
                       ) -> float | None:
    """class_diversity over the images the evaluator assigns to their class only: a
    model that draws more wrong digits does not look more diverse. None when no class
    keeps two such images."""
    correct = logits.argmax(1) == classes
    try:
        return class_diversity(features[correct], classes[correct])
    except ValueError:
        return None


def set_figures(gen: dict[str, torch.Tensor], real: dict[str, torch.Tensor],
                gen_classes: torch.Tensor, labels: torch.Tensor, real_labels: torch.Tensor,
                k: int) -> dict[str, float | None]:
    """The figures of the generated set as a whole, from the evaluator's 'features' and
    'logits' and the fidelity network's 'fid' features of the generated (``gen``) and
    real images: density and coverage, within-class diversity (of the images assigned
    to their class; of all images; of the real images) and class accuracy."""
    return {
        **density_coverage(gen["fid"], real["fid"], k),
        "diversity": on_class_diversity(gen["features"], gen["logits"], gen_classes),
        "diversity_all": class_diversity(gen["features"], gen_classes),
        "diversity_real": on_class_diversity(real["features"], real["logits"], real_labels),
        "class_accuracy": class_accuracy(gen["logits"], labels),
    }


# -- within-class selection ------------------------------------------------------

def stratified_keep(scores: torch.Tensor, classes: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the kept_count(n_c, fraction) lowest-score images of every class
    (ties: lower index first), sorted: every class keeps the same fraction."""
    kept = []
    for cls in torch.unique(classes).tolist():
        where = torch.nonzero(classes == cls).flatten()
        kept.append(where[most_certain(scores[where], fraction)])
    return torch.cat(kept).sort().values


def stratified_random(classes: torch.Tensor, fraction: float, generator: torch.Generator
                      ) -> torch.Tensor:
    """The same per-class counts as stratified_keep, drawn at random within each class."""
    return stratified_keep(torch.rand(len(classes), generator=generator, dtype=torch.float64),
                           classes, fraction)


def stratified_curves(scores: dict[str, torch.Tensor], classes: torch.Tensor,
                      fractions: Sequence[float], metric: SubsetMetric, random_repeats: int,
                      seed: int) -> list[dict]:
    """Selective-generation curves with within-class selection: each score keeps its most certain
    ``fraction`` of every class; 'random' rows average ``random_repeats`` stratified
    random subsets of the same per-class counts. A kept set met before (every score at
    fraction 1) is not scored again."""
    cache: dict[bytes, dict] = {}

    def scored(kept: torch.Tensor) -> dict:
        key = kept.numpy().tobytes()
        if key not in cache:
            cache[key] = metric(kept)
        return cache[key]

    rows = []
    for name, values in scores.items():
        for fraction in fractions:
            kept = stratified_keep(values, classes, fraction)
            rows.append({"score": name, "fraction": fraction, "kept": len(kept), "repeats": 1,
                         **scored(kept)})
    gen = torch.Generator().manual_seed(seed)
    for fraction in fractions:
        draws = [stratified_random(classes, fraction, gen) for _ in range(random_repeats)]
        results = [scored(kept) for kept in draws]
        rows.append({"score": "random", "fraction": fraction, "kept": len(draws[0]),
                     "repeats": random_repeats,
                     **{key: _mean([r[key] for r in results]) for key in results[0]}})
    return rows


# -- within-class statistics with a stratified bootstrap -------------------------------
#
# Every statistic is computed on "groups": integer arrays (B, C, n) of image indices, one
# row of C classes of n images per bootstrap draw (classes of equal size share a group).
# The point estimate is the single draw that takes every image once; a bootstrap draw
# resamples each class with replacement, so every class keeps its size.

def _class_groups(classes: np.ndarray) -> list[np.ndarray]:
    """The classes' image indices, as (C_g, n_g) arrays of classes of equal size n_g."""
    by_size: dict[int, list[np.ndarray]] = {}
    for cls in np.unique(classes):
        where = np.flatnonzero(classes == cls)
        by_size.setdefault(len(where), []).append(where)
    return [np.stack(members) for _, members in sorted(by_size.items())]


def _kept_counts(n: int, coverages: np.ndarray) -> np.ndarray:
    """kept_count(n, c) for every coverage c (round half to even, as Python's round)."""
    return np.clip(np.round(coverages * n).astype(np.int64), 1, n)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) along the last axis: ties share their mean rank."""
    return rankdata(values, axis=-1)


def within_class_auroc(score, failed, classes) -> float:
    """Point estimate of the within-class AUROC through scikit-learn: per class
    roc_auc_score, weighted by the class's number of (failed, good) pairs."""
    from sklearn.metrics import roc_auc_score

    score, failed, classes = (np.asarray(x) for x in (score, failed, classes))
    total, pairs = 0.0, 0
    for cls in np.unique(classes):
        f, s = failed[classes == cls].astype(bool), score[classes == cls]
        n_pairs = int(f.sum()) * int((~f).sum())
        if n_pairs:
            total += roc_auc_score(f, s) * n_pairs
            pairs += n_pairs
    return total / pairs if pairs else float("nan")


def within_class_spearman(a, b, classes) -> float:
    """Point estimate through scipy: the mean over classes of spearmanr(a, b) within the
    class, classes where either is constant left out."""
    from scipy.stats import spearmanr

    a, b, classes = (np.asarray(x) for x in (a, b, classes))
    rhos = []
    for cls in np.unique(classes):
        x, y = a[classes == cls], b[classes == cls]
        if len(x) > 1 and np.ptp(x) > 0 and np.ptp(y) > 0:
            rhos.append(float(spearmanr(x, y).statistic))
    return float(np.mean(rhos)) if rhos else float("nan")


def aurc(score, loss, classes) -> dict[str, float]:
    """Area under the within-class risk-coverage curve of ``score`` (the mean of the
    risk over the coverages m / n_max, m = 1..n_max: with one class, the mean over k of
    the mean loss of the k lowest-score images), and of the oracle and random controls."""
    score, loss, classes = (np.asarray(x, dtype=np.float64) for x in (score, loss, classes))
    groups = _class_groups(classes)
    curves = _draw_stats({"s": score}, None, {"r": loss}, {}, [g[None] for g in groups],
                         coverage_grid(groups), ())
    return {"score": float(curves["s", "curve", "r"].mean()),
            "random": float(curves["random", "curve", "r"].mean()),
            "oracle": float(curves["oracle", "curve", "r"].mean())}


def coverage_grid(groups: list[np.ndarray]) -> np.ndarray:
    """m / n_max, m = 1..n_max (n_max the largest class): with classes of equal size,
    every class keeps exactly m images at coverage m / n."""
    n = max(g.shape[-1] for g in groups)
    return np.arange(1, n + 1) / n


def _centred_ranks(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = _ranks(values)
    r = r - r.mean(-1, keepdims=True)
    return r, np.sqrt((r * r).sum(-1))


def _draw_stats(scores: dict[str, np.ndarray], failed: np.ndarray | None,
                risks: dict[str, np.ndarray], qualities: dict[str, np.ndarray],
                draws: list[np.ndarray], coverages: np.ndarray, extremes: Sequence[float]
                ) -> dict[tuple, np.ndarray]:
    """All within-class statistics of every score for the draws (B, C, n) of each group:
    (score, 'curve', risk) the mean loss of the kept images at every coverage when each
    class keeps its kept_count(n_c, c) lowest-score images, (B, M), with ('oracle',
    'curve', risk) (ranked by the loss itself) and ('random', 'curve', risk) (the
    expectation of a uniformly random choice within each class); (score, 'auroc') the
    probability that a failed image scores higher than a good image of the same class
    (ties count half), pooled over the classes' pairs, (B,); (score, 'spearman', q) the
    mean over classes of the within-class Spearman correlation with quality q (classes
    where either is constant left out), (B,); ('base', 'failure') the failure rate, (B,),
    and (score, 'certain') / (score, 'uncertain') the failure rate of the
    kept_count(n_c, f) lowest / highest scores of every class for every f of
    ``extremes``, (B, E). NaN where undefined."""
    acc: dict[tuple, np.ndarray | float] = {}

    def add(key, value):
        acc[key] = acc.get(key, 0.0) + value

    for idx in draws:
        n = idx.shape[-1]
        counts = _kept_counts(n, coverages)
        add(("kept",), idx.shape[1] * counts)
        losses = {r: v[idx] for r, v in risks.items()}
        for r, los in losses.items():
            add(("oracle", r), np.cumsum(np.sort(los, -1), -1)[..., counts - 1].sum(1))
            add(("random", r), los.mean(-1).sum(1)[:, None] * counts[None])
        q_ranks = {q: _centred_ranks(v[idx]) for q, v in qualities.items()}
        if failed is not None:
            f = failed[idx].astype(np.float64)
            n_fail = f.sum(-1)
            add(("pairs",), (n_fail * (n - n_fail)).sum(-1))
            add(("failures",), n_fail.sum(-1))
            add(("images",), idx.shape[1] * n)
            tail = _kept_counts(n, np.asarray(extremes, dtype=np.float64))
            add(("tail",), idx.shape[1] * tail)
        for name, values in scores.items():
            v = values[idx]
            order = np.argsort(v, axis=-1, kind="stable")
            for r, los in losses.items():
                ranked = np.cumsum(np.take_along_axis(los, order, -1), -1)
                add((name, r), ranked[..., counts - 1].sum(1))
            if failed is not None:  # failures among the first m: cum[m], m = 0..n
                cum = np.cumsum(np.take_along_axis(f, order, -1), -1)
                cum = np.concatenate([np.zeros_like(cum[..., :1]), cum], -1)
                add((name, "certain"), cum[..., tail].sum(1))
                add((name, "uncertain"), (cum[..., -1:] - cum[..., n - tail]).sum(1))
            if failed is None and not q_ranks:
                continue
            rank = _ranks(v)
            if failed is not None:
                add((name, "u"), ((rank * f).sum(-1) - n_fail * (n_fail + 1) / 2).sum(-1))
            rc = rank - rank.mean(-1, keepdims=True)
            norm_s = np.sqrt((rc * rc).sum(-1))
            for q, (rq, norm_q) in q_ranks.items():
                norm = norm_s * norm_q
                valid = norm > 0
                rho = (rc * rq).sum(-1) / np.where(valid, norm, 1.0)
                add((name, "rho", q), np.where(valid, rho, 0.0).sum(-1))
                add((name, "valid", q), valid.sum(-1))

    return _stats_from_sums(acc, scores, risks, qualities, failed is not None)


def _stats_from_sums(acc: dict, scores: dict, risks: dict, qualities: dict, has_failures: bool
                     ) -> dict[tuple, np.ndarray]:
    """The statistics of _draw_stats from its sums over classes (NaN where undefined)."""
    out: dict[tuple, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        if has_failures:
            out["base", "failure"] = acc["failures",] / acc["images",]
        for r in risks:
            for name in [*scores, "oracle", "random"]:
                out[name, "curve", r] = acc[name, r] / acc["kept",]
        for name in scores:
            if has_failures:
                pairs = acc["pairs",]
                out[name, "auroc"] = np.where(pairs > 0, acc[name, "u"] / np.maximum(pairs, 1),
                                              np.nan)
                for side in ("certain", "uncertain"):
                    out[name, side] = acc[name, side] / acc["tail",]
            for q in qualities:
                valid = acc[name, "valid", q]
                out[name, "spearman", q] = np.where(valid > 0,
                                                    acc[name, "rho", q] / np.maximum(valid, 1),
                                                    np.nan)
    return out


def _interval(values: np.ndarray) -> tuple[float | None, float | None]:
    values = values[np.isfinite(values)]
    if not len(values):
        return None, None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _score_summaries(raw: dict, scores: list[str], risks: list[str], qualities: list[str],
                     extremes: Sequence[float]) -> dict[tuple[str, str], np.ndarray]:
    """Per score: AUROC, the base failure rate and the failure rate of each tail, per
    risk the AURC with its random and oracle controls, the AURC gain and the curves, per
    quality the Spearman correlation."""
    out = {}
    for sc in scores:
        out[sc, "auroc"] = raw[sc, "auroc"]
        out[sc, "failure_rate"] = raw["base", "failure"]
        for i, fraction in enumerate(extremes):
            for side in ("certain", "uncertain"):
                out[sc, f"failure_{side}{_tag(fraction)}"] = raw[sc, side][..., i]
        for r in risks:
            area = {name: raw[key, "curve", r].mean(-1)
                    for name, key in (("score", sc), ("random", "random"), ("oracle", "oracle"))}
            out[sc, f"aurc_{r}"] = area["score"]
            out[sc, f"aurc_{r}_random"] = area["random"]
            out[sc, f"aurc_{r}_oracle"] = area["oracle"]
            with np.errstate(invalid="ignore", divide="ignore"):
                out[sc, f"aurc_gain_{r}"] = ((area["random"] - area["score"])
                                             / (area["random"] - area["oracle"]))
            out[sc, f"curve_{r}"] = {"score": raw[sc, "curve", r],
                                     "random": raw["random", "curve", r],
                                     "oracle": raw["oracle", "curve", r]}
        for q in qualities:
            out[sc, f"spearman_{q}"] = raw[sc, "spearman", q]
    return out


def selective_statistics(scores: dict[str, torch.Tensor], classes: torch.Tensor,
                         failed: torch.Tensor, risks: dict[str, torch.Tensor],
                         qualities: dict[str, torch.Tensor], repeats: int, seed: int,
                         extremes: Sequence[float] = EXTREME_FRACTIONS,
                         chunk_elements: int = 5_000_000) -> tuple[list[dict], list[dict]]:
    """Within-class selective-generation statistics of every uncertainty score, with
    stratified bootstrap 95 % intervals (percentile; ``repeats`` draws shared by all
    scores, so they are paired).

    Per score: ``auroc`` (failed images, within class), ``failure_rate`` (the base rate,
    the same for every score), ``failure_certainT`` / ``failure_uncertainT`` (the failure
    rate of the most / least certain fraction f of every class, T = 100 f, for every f
    of ``extremes``; ties: the lower index counts as more certain), per risk r (a per-image loss,
    lower is better): ``aurc_r`` and its random and oracle controls, ``aurc_gain_r`` =
    (random - score) / (random - oracle) (0: no better than random, 1: the oracle);
    per quality q (higher is better): ``spearman_q`` (within class; negative when
    uncertain images are worse). Each with ``_lo`` and ``_hi``.

    Returns (one row per score, risk-coverage rows {score, risk, coverage, value} with
    'random' and 'oracle' as scores)."""
    cls = classes.numpy()
    groups, fail = _class_groups(cls), failed.numpy().astype(bool)
    coverages = coverage_grid(groups)
    risk_np = {r: v.double().numpy() for r, v in risks.items()}
    qual_np = {q: v.double().numpy() for q, v in qualities.items()}
    score_np = {s: v.double().numpy() for s, v in scores.items()}

    def stats(draws: list[np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
        raw = _draw_stats(score_np, fail, risk_np, qual_np, draws, coverages, extremes)
        return _score_summaries(raw, list(score_np), list(risk_np), list(qual_np), extremes)

    point = stats([g[None] for g in groups])
    rng = np.random.default_rng(seed)
    per_draw = max(1, chunk_elements // max(len(cls), 1))
    boot: dict[tuple[str, str], list[np.ndarray]] = {}
    for start in range(0, repeats, per_draw):
        b = min(per_draw, repeats - start)
        draws = [np.take_along_axis(g[None].repeat(b, 0),
                                    rng.integers(0, g.shape[1], (b, *g.shape)), -1)
                 for g in groups]
        for key, value in stats(draws).items():
            if not key[1].startswith("curve_"):
                boot.setdefault(key, []).append(value)

    rows = []
    for s in score_np:
        row: dict = {"score": s}
        for (name, stat), value in point.items():
            if name != s or stat.startswith("curve_"):
                continue
            row[stat] = _finite(value[0])
            if not stat.endswith(("_random", "_oracle")):
                row[f"{stat}_lo"], row[f"{stat}_hi"] = _interval(np.concatenate(boot[s, stat]))
        rows.append(row)
    curve_rows = []
    first = next(iter(score_np))
    for r in risk_np:
        curves = {s: point[s, f"curve_{r}"]["score"][0] for s in score_np}
        curves["random"] = point[first, f"curve_{r}"]["random"][0]
        curves["oracle"] = point[first, f"curve_{r}"]["oracle"][0]
        for s, curve in curves.items():
            curve_rows += [{"score": s, "risk": r, "coverage": float(c), "value": float(v)}
                           for c, v in zip(coverages, curve, strict=True)]
    return rows, curve_rows


def selective_figures(rows: list[dict], stats: list[dict], smallest: float) -> dict:
    """The selective tables' figures as flat metric keys: the base failure rate with its
    interval, the failure AURC of the random and oracle controls, the subset FID of
    every ranking at the ``smallest`` kept fraction (``rows`` of stratified_curves), and
    per score (``stats`` of selective_statistics) AUROC, AURC and its gain, Spearman and
    the failure rate of each tail (``failure_certain5_<score>`` ...), with intervals."""
    figures = {"failure_rate": stats[0]["failure_rate"],
               "failure_rate_lo": stats[0]["failure_rate_lo"],
               "failure_rate_hi": stats[0]["failure_rate_hi"],
               "aurc_random": stats[0]["aurc_failure_random"],
               "aurc_oracle": stats[0]["aurc_failure_oracle"], "selective_fraction": smallest}
    figures.update({f"selective_fid_{r['score']}": r["fid"] for r in rows
                    if r["fraction"] == smallest})
    for row in stats:
        sc = row["score"]
        figures.update({
            f"auroc_{sc}": row["auroc"], f"auroc_{sc}_lo": row["auroc_lo"],
            f"auroc_{sc}_hi": row["auroc_hi"], f"aurc_{sc}": row["aurc_failure"],
            f"aurc_gain_{sc}": row["aurc_gain_failure"],
            f"aurc_gain_{sc}_lo": row["aurc_gain_failure_lo"],
            f"aurc_gain_{sc}_hi": row["aurc_gain_failure_hi"],
            f"spearman_{sc}": row["spearman_log_p"], f"spearman_{sc}_lo": row["spearman_log_p_lo"],
            f"spearman_{sc}_hi": row["spearman_log_p_hi"]})
        tails = [stat for stat in row if stat.startswith(("failure_certain", "failure_uncertain"))
                 and not stat.endswith(("_lo", "_hi"))]
        figures.update({f"{stat}_{sc}{end}": row[f"{stat}{end}"]
                        for stat in tails for end in ("", "_lo", "_hi")})
    return figures


def scale_auroc(maps: dict[str, list[torch.Tensor]], classes: torch.Tensor, failed: torch.Tensor,
                repeats: int, seed: int) -> dict[str, float | None]:
    """Within-class AUROC of every scale's mean score alone, with bootstrap intervals
    (the draws of selective_statistics with the same ``seed``): ``auroc_<m>_scale<k>``
    (k = 1..K, coarse to fine) and its ``_lo`` / ``_hi``, for every measure m of the
    per-scale ``maps``. Shows which scales carry the signal that the group means mix."""
    _, per_scale = aggregate(maps)
    scores = {f"{m}_scale{k + 1}": v[:, k] for m, v in per_scale.items()
              for k in range(v.shape[1])}
    rows, _ = selective_statistics(scores, classes, failed, {}, {}, repeats, seed, extremes=())
    return {f"auroc_{row['score']}{end}": row[f"auroc{end}"] for row in rows
            for end in ("", "_lo", "_hi")}


def score_correlations(scores: dict[str, torch.Tensor], classes: torch.Tensor) -> dict:
    """Within-class Spearman correlation (mean over classes) of every pair of scores
    (None where a score is constant within every class)."""
    names = list(scores)
    groups = [g[None] for g in _class_groups(classes.numpy())]
    values = {s: v.double().numpy() for s, v in scores.items()}
    matrix = [[_finite(_draw_stats({a: values[a]}, None, {}, {b: values[b]}, groups,
                                   np.ones(1), ())[a, "spearman", b][0]) for b in names]
              for a in names]
    return {"scores": names, "spearman": matrix}
