"""The comparison: one table over variants (rows) and metrics (columns), paired
differences to the baselines, and the selective-generation tables (figures: up/evaluation/figures.py).

With several training seeds a cell is mean +- sample standard deviation over
the seeds; the seeds and sample counts are printed beside the numbers, since
FID and friends are only comparable at equal N.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from up.generation.scores import ALL_MEASURES, IMAGE_SCORES

# (key in metrics/eval-*.json, column title); arrows say which direction is better.
MAIN_COLUMNS = [
    ("fid", "FID ↓"), ("kid_mean", "KID ↓"), ("is_mean", "IS ↑"), ("precision", "precision ↑"),
    ("recall", "recall ↑"), ("diversity", "diversity"), ("density", "density"),
    ("coverage", "coverage ↑"), ("class_accuracy", "class acc ↑"),
    ("ece", "ECE ↓"), ("nll", "NLL ↓"), ("brier", "Brier ↓"), ("token_accuracy", "token acc"),
]
# The per-image uncertainty scores are up.generation.scores.IMAGE_SCORES (RANKED here); the
# controls 'random' and 'oracle' are added per table.
RANKED = IMAGE_SCORES
# Selective generation tables: (title, explanation, [(key, column title)]).
SELECTIVE_TABLES = [
    ("Within-class AUROC for failed samples ↑",
     "Probability that a failed sample (misclassified by the evaluator, or realism below the "
     "threshold) has a higher score than a good sample of the same class; 0.5 = chance.",
     [(f"auroc_{s}", s) for s in RANKED]),
    ("AURC gain over random ↑ (failure risk)",
     "(AURC_random − AURC_score) / (AURC_random − AURC_oracle) of the within-class "
     "risk-coverage curve of the failure rate: 0 = no better than dropping at random, "
     "1 = as good as ranking by the failure itself. `random`/`oracle`: their AURC.",
     [(f"aurc_gain_{s}", s) for s in RANKED]
     + [("aurc_random", "AURC random"), ("aurc_oracle", "AURC oracle")]),
    ("Within-class Spearman correlation with log p(y | x)",
     "Mean over classes of the rank correlation between the score and the evaluator's "
     "log-probability of the conditioned class; negative = uncertain samples are worse.",
     [(f"spearman_{s}", s) for s in RANKED]),
    ("Stratified subset FID ↓",
     "FID of the most certain fraction of every class; `random`: stratified random subsets "
     "of the same per-class sizes; `oracle`: ranked by −log p(y | x). Lower than `random` "
     "means the score removes bad samples, but FID also penalises lost diversity.",
     [(f"selective_fid_{s}", s) for s in ALL_MEASURES]
     + [("selective_fid_random", "random"), ("selective_fid_oracle", "oracle")]),
]
SELECTIVE_COLUMNS = [column for _, _, columns in SELECTIVE_TABLES for column in columns]
# Bootstrap interval keys shown beside single-seed cells.
SELECTIVE_KEYS = [key for key, _ in SELECTIVE_COLUMNS] + [
    f"{key}_{end}" for key, _ in SELECTIVE_COLUMNS
    if key.startswith(("auroc_", "aurc_gain_", "spearman_")) for end in ("lo", "hi")]


def aggregate(runs: dict[str, dict[int, dict]], keys: Sequence[str]) -> dict[str, dict]:
    """runs[variant][seed] = one eval metrics dict -> per variant: seeds, sample counts and
    per key {mean, std (None for one seed), values}; a key missing or null in any run is null."""
    summary = {}
    for variant, by_seed in runs.items():
        seeds = sorted(by_seed)
        metrics = {}
        for key in keys:
            values = [by_seed[s].get(key) for s in seeds]
            if any(v is None for v in values):
                metrics[key] = {"mean": None, "std": None, "values": values}
                continue
            metrics[key] = {"mean": statistics.fmean(values),
                            "std": statistics.stdev(values) if len(values) > 1 else None,
                            "values": values}
        summary[variant] = {
            "seeds": seeds,
            "n_samples": sorted({by_seed[s]["n_samples"] for s in seeds}),
            "n_real": sorted({by_seed[s]["n_real"] for s in seeds}),
            "feature_extractor": sorted({by_seed[s]["feature_extractor"] for s in seeds}),
            "metrics": metrics,
        }
    return summary


# The figures of the paired comparison with the baselines (variant minus baseline, per seed).
PAIRED_KEYS = [("fid", "FID ↓"), ("precision", "precision ↑"), ("recall", "recall ↑"),
               ("diversity", "diversity"), ("class_accuracy", "class acc ↑"), ("ece", "ECE ↓"),
               ("nll", "NLL ↓")]


def t_interval(values: Sequence[float], level: float = 0.95) -> dict[str, float | int | None]:
    """Mean and Student-t interval of the mean; with n seeds the interval has n - 1
    degrees of freedom (3 seeds: t = 4.30, so it is wide)."""
    from scipy.stats import t

    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    half = float(t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(values) / n ** 0.5
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def paired_differences(runs: dict[str, dict[int, dict]], baseline: str,
                       keys: Sequence[str]) -> dict[str, dict[str, dict]]:
    """For every other variant, per key: the differences variant - baseline seed by
    seed (same training seed: same data order, same sampling seed), their mean and
    95 % t-interval. Only the seeds both ran are paired."""
    out = {}
    for variant, by_seed in runs.items():
        if variant == baseline:
            continue
        seeds = sorted(set(by_seed) & set(runs[baseline]))
        out[variant] = {}
        for key in keys:
            diffs = [by_seed[s].get(key) - runs[baseline][s].get(key) for s in seeds
                     if by_seed[s].get(key) is not None and runs[baseline][s].get(key) is not None]
            out[variant][key] = {**t_interval(diffs), "seeds": seeds} if diffs else None
    return out


def _paired_cell(entry: dict | None) -> str:
    if entry is None:
        return "n/a"
    if entry["low"] is None:
        return f"{entry['mean']:+.3g}"
    star = "*" if entry["low"] > 0 or entry["high"] < 0 else ""
    return f"{entry['mean']:+.3g} [{entry['low']:+.2g}, {entry['high']:+.2g}]{star}"


def paired_markdown(paired: dict[str, dict[str, dict]]) -> list[str]:
    """One table per baseline: rows variants, cells mean difference [95 % interval];
    * marks an interval that excludes 0."""
    lines = []
    for baseline, by_variant in paired.items():
        head = ["variant − " + baseline, "seeds"] + [title for _, title in PAIRED_KEYS]
        lines += ["", f"### Paired with `{baseline}`", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for variant, cells in by_variant.items():
            seeds = next((c["seeds"] for c in cells.values() if c is not None), [])
            row = [variant, ",".join(map(str, seeds))]
            row += [_paired_cell(cells[key]) for key, _ in PAIRED_KEYS]
            lines.append("| " + " | ".join(row) + " |")
    return lines


# The figures `dvc exp show` lists per experiment (results/metrics.json).
HEADLINE_KEYS = ["fid", "kid_mean", "is_mean", "precision", "recall", "diversity",
                 "class_accuracy", "ece"]


def headline(summary: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """Per variant, the mean over seeds of each headline figure: a small flat file,
    so that experiment tables compare variants without the per-seed noise columns."""
    return {variant: {key: entry["metrics"][key]["mean"] for key in HEADLINE_KEYS}
            for variant, entry in summary.items()}


def format_cell(entry: dict) -> str:
    if entry["mean"] is None:
        return "n/a"
    if entry["std"] is None:
        return f"{entry['mean']:.4g}"
    return f"{entry['mean']:.4g} ± {entry['std']:.2g}"


def _table(summary: dict[str, dict], columns: list[tuple[str, str]]) -> list[str]:
    head = ["variant", "seeds", "N gen / N real"] + [title for _, title in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, entry in summary.items():
        counts = (f"{'/'.join(map(str, entry['n_samples']))} / "
                  f"{'/'.join(map(str, entry['n_real']))}")
        cells = [variant, ",".join(map(str, entry["seeds"])), counts]
        cells += [format_cell(entry["metrics"][key]) for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict[str, dict], selective_fraction: float | None,
             paired: dict[str, dict[str, dict]] | None = None) -> str:
    extractors = sorted({e for v in summary.values() for e in v["feature_extractor"]})
    multi = any(len(v["seeds"]) > 1 for v in summary.values())
    lines = [
        "# Results",
        "",
        f"Feature network for FID/KID/IS/precision/recall: {', '.join(extractors)}. "
        "Generated images are compared with the test split; calibration (ECE, NLL, Brier, "
        "token accuracy) is of the token predictions on the val tokens. Figures under "
        "results/ show the first seed of each variant.",
        "",
        ("Cells are mean ± sample std over the listed training seeds."
         if multi else "One training seed per variant: cells are single values."),
        "",
        *_table(summary, MAIN_COLUMNS),
    ]
    if paired:
        lines += ["", "## Paired differences over seeds",
                  "", "Each cell: mean over seeds of (variant − baseline) with the same training "
                  "seed (same data order and sampling seed), and its 95 % Student-t interval "
                  "(n − 1 degrees of freedom: with 3 seeds t = 4.30, so intervals are wide); "
                  "* marks an interval that excludes 0.", *paired_markdown(paired)]
    if selective_fraction is not None:
        lines += selective_markdown(summary, selective_fraction)
    return "\n".join(lines) + "\n"


def _selective_cell(entry: dict, lo: dict | None, hi: dict | None) -> str:
    """mean ± std over seeds; one seed: the value and its bootstrap 95 % interval."""
    if entry["mean"] is None or entry["std"] is not None or lo is None or lo["mean"] is None:
        return format_cell(entry)
    return f"{entry['mean']:.3g} [{lo['mean']:.3g}, {hi['mean']:.3g}]"


def selective_markdown(summary: dict[str, dict], selective_fraction: float) -> list[str]:
    """The selective-generation tables: rows variants, columns uncertainty scores."""
    lines = ["", "## Selective generation",
             "", "Images are ranked by each uncertainty score within their class (every class "
             "keeps the same fraction). Scores: entropy, dispersion, semantic entropy of the "
             "guided distribution; cond_entropy and surprisal (−log p_cond of the sampled "
             "token) of the conditional one; `_fine`: mean over the finest scales only. "
             "Several seeds: mean ± std over seeds; one seed: value [bootstrap 95 % interval]."]
    for title, text, columns in SELECTIVE_TABLES:
        if title.startswith("Stratified subset FID"):
            title = f"{title}: most certain {selective_fraction:.0%} of every class"
        head = ["variant", "seeds", "N gen / N real"] + [t for _, t in columns]
        lines += ["", f"### {title}", "", text, "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for variant, entry in summary.items():
            metrics = entry["metrics"]
            counts = (f"{'/'.join(map(str, entry['n_samples']))} / "
                      f"{'/'.join(map(str, entry['n_real']))}")
            cells = [variant, ",".join(map(str, entry["seeds"])), counts]
            cells += [_selective_cell(metrics[key], metrics.get(f"{key}_lo"),
                                      metrics.get(f"{key}_hi")) for key, _ in columns]
            lines.append("| " + " | ".join(cells) + " |")
    return lines
