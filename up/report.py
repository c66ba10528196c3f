"""The comparison: one table over variants (rows) and metrics (columns), and figures.

With several training seeds a cell is mean +- sample standard deviation over
the seeds; the seeds and sample counts are printed beside the numbers, since
FID and friends are only comparable at equal N.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

# (key in metrics/eval-*.json, column title); arrows say which direction is better.
MAIN_COLUMNS = [
    ("fid", "FID ↓"), ("kid_mean", "KID ↓"), ("is_mean", "IS ↑"), ("precision", "precision ↑"),
    ("recall", "recall ↑"), ("diversity", "diversity"), ("class_accuracy", "class acc ↑"),
    ("ece", "ECE ↓"), ("nll", "NLL ↓"), ("brier", "Brier ↓"), ("token_accuracy", "token acc"),
]
SCORES = ["entropy", "dispersion", "semantic_entropy", "random"]
SELECTIVE_COLUMNS = [(f"selective_fid_{s}", s) for s in SCORES]


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
        lines += [
            "",
            f"## Selective generation: FID of the most certain {selective_fraction:.0%} of samples",
            "",
            "Images ranked by each uncertainty score; `random` drops the same number at random "
            "(mean over seeded draws). Lower than `random` means the score finds the bad samples.",
            "",
            *_table(summary, SELECTIVE_COLUMNS),
        ]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability_figure(curves: dict[str, list[dict]]):
    """Reliability diagrams (top-1 confidence vs accuracy per bin), one line per label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--", label="calibrated")
    for label, bins in curves.items():
        used = [b for b in bins if b["count"] > 0]
        ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], marker="o",
                ms=3, label=label)
    ax.set(xlabel="confidence (top-1)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title="reliability of token predictions (val)")
    ax.legend(fontsize=7)
    return fig


def selective_figure(curves: dict[str, list[dict]], metric: str = "fid"):
    """``metric`` against the kept fraction: one panel per uncertainty score, one line per
    label; the random-drop control dashed in every panel."""
    plt = _pyplot()
    scores = [s for s in SCORES if s != "random"]
    fig, axes = plt.subplots(1, len(scores), figsize=(3.6 * len(scores), 3.2), squeeze=False,
                             sharey=True)
    for ax, score in zip(axes[0], scores, strict=True):
        for i, (label, rows) in enumerate(curves.items()):
            color = f"C{i}"
            for name, style in ((score, "-"), ("random", "--")):
                picked = sorted((r["fraction"], r[metric]) for r in rows
                                if r["score"] == name and r[metric] is not None)
                if picked:
                    xs, ys = zip(*picked, strict=True)
                    ax.plot(xs, ys, style, color=color, marker="o", ms=3,
                            label=label if name == score else f"{label} random")
        ax.set(title=f"ranked by {score}", xlabel="kept fraction (most certain)")
        ax.invert_xaxis()
    axes[0, 0].set_ylabel(metric)
    axes[0, -1].legend(fontsize=6)
    return fig


def grids_figure(grids: dict[str, Path]):
    """The variants' sample grids side by side."""
    plt = _pyplot()
    from PIL import Image

    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.6), squeeze=False)
    for ax, (label, path) in zip(axes[0], grids.items(), strict=True):
        with Image.open(path) as img:
            ax.imshow(img.convert("RGB"), interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    return fig
