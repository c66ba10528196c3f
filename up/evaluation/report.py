"""The comparison: one table over variants (rows) and metrics (columns), paired
differences to the baselines, and the selective-generation tables (figures: up/evaluation/figures.py).

With several training seeds a cell is mean +- sample standard deviation over
the seeds; the seeds and sample counts are printed beside the numbers, since
FID and friends are only comparable at equal N.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from up.core import paths
from up.evaluation import calibration, fidelity, selective
from up.evaluation.metrics import (
    headline_keys,
    main_columns,
    paired_columns,
    register,
    summary_keys,
    tables,
)

# Every declared metric, in column order: image quality, the generated set (diversity,
# class accuracy) and selective generation, token calibration. The tables, the headline
# file and the paired columns read it when they are written (a test may extend it).
METRICS = register(fidelity.METRICS, selective.METRICS, calibration.METRICS)
# The figures `dvc exp show` lists per experiment (results/metrics.json), as declared.
HEADLINE_KEYS = headline_keys(METRICS)


def report_keys() -> list[str]:
    """The keys results/summary.json aggregates over seeds."""
    return summary_keys(METRICS)


def paired_keys() -> list[str]:
    """The keys compared with the baselines seed by seed."""
    return [key for key, _ in paired_columns(METRICS)]


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
    lines, columns = [], paired_columns(METRICS)
    for baseline, by_variant in paired.items():
        head = ["variant − " + baseline, "seeds"] + [title for _, title in columns]
        lines += ["", f"### Paired with `{baseline}`", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for variant, cells in by_variant.items():
            seeds = next((c["seeds"] for c in cells.values() if c is not None), [])
            row = [variant, ",".join(map(str, seeds))]
            row += [_paired_cell(cells[key]) for key, _ in columns]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def headline(summary: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """Per variant, the mean over seeds of each headline figure: a small flat file,
    so that experiment tables compare variants without the per-seed noise columns."""
    keys = headline_keys(METRICS)
    return {variant: {key: entry["metrics"][key]["mean"] for key in keys}
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
        f"{paths.RESULTS}/ show the first seed of each variant.",
        "",
        ("Cells are mean ± sample std over the listed training seeds."
         if multi else "One training seed per variant: cells are single values."),
        "",
        *_table(summary, main_columns(METRICS)),
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
    for table, columns in tables(METRICS):
        head = ["variant", "seeds", "N gen / N real"] + [m.title for m in columns]
        lines += ["", f"### {table.title.format(fraction=selective_fraction)}", "", table.text, "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for variant, entry in summary.items():
            metrics = entry["metrics"]
            counts = (f"{'/'.join(map(str, entry['n_samples']))} / "
                      f"{'/'.join(map(str, entry['n_real']))}")
            cells = [variant, ",".join(map(str, entry["seeds"])), counts]
            cells += [_selective_cell(metrics[m.key], metrics.get(f"{m.key}_lo"),
                                      metrics.get(f"{m.key}_hi")) for m in columns]
            lines.append("| " + " | ".join(cells) + " |")
    return lines
