"""Comparing variants at equal quality: quality-diversity frontiers over the guidance scale.

Guidance alone trades quality for diversity, so a variant that is only less
sharp looks more diverse at a fixed guidance. Each run (variant, seed) is
therefore swept over guidance (the sweep@ stages), which gives a curve of
points (quality, diversity) ordered by guidance, and variants are compared at
the same quality along their curves:

* **monotone quality**: along the guidance order, quality (precision, class
  accuracy) is fitted non-decreasing by pooling adjacent violators (a noisy dip
  becomes a flat stretch at the pooled mean); the diversity figure (recall,
  within-class diversity) is kept as measured.
* **value at matched quality**: linear interpolation between the two
  neighbouring guidance values whose fitted quality brackets the level (the
  mean of the diversity figure over points exactly at the level, when a flat
  stretch sits there); no extrapolation: a curve that does not reach the level
  has no value.
* **the level**: unless fixed in params (``sweep.match_precision`` /
  ``sweep.match_class_accuracy``), the midpoint of the quality range that every
  run's fitted curve reaches (the intersection over variants and seeds of
  [fitted quality at the lowest guidance, at the highest]), so every run is
  read inside its own sweep and seeds can be paired.
* **over seeds**: the value is read on each seed's own curve; the table gives
  the mean and 95 % t-interval over seeds (``up.evaluation.report.t_interval``).
* **paired with a baseline, over a range**: on the quality range both variants'
  seeds reach, the difference variant - baseline is read on a grid of ``GRID``
  levels and averaged (the mean vertical gap between the curves over the range),
  per seed; the table gives its mean, 95 % t-interval over seeds and the range.
* **axes**: a sweep file's rows carry ``axis`` (guidance | temperature |
  truncation; none: guidance, the old format). Temperature rows (sampled at the
  sample guidance, hotter = less sharp, so ordered from hot to cold) form a curve
  of their own, ``ce (temperature)``, compared like a variant; truncation rows
  (top-k / top-p) are a table beside the untruncated row at the same guidance.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np

from up.evaluation import metrics, report
from up.evaluation.report import paired_cell, t_interval, t_test_p

# (quality key, diversity key): the diversity figure is read at matched quality.
MATCHED = [("precision", "recall"), ("class_accuracy", "diversity")]
GRID = 11  # levels a pair's difference is read at across the range both reach
# the curve axes: the row field that orders a curve, and its order's sign (quality rises)
AXES = {"guidance": ("guidance", 1.0), "temperature": ("temperature", -1.0)}
TRUNCATION = "truncation"


def axis_rows(sweep: dict) -> dict[str, list[dict]]:
    """A sweep file's rows by axis (rows without ``axis``: guidance)."""
    out: dict[str, list[dict]] = {axis: [] for axis in (*AXES, TRUNCATION)}
    for row in sweep["rows"]:
        out.setdefault(row.get("axis") or "guidance", []).append(row)
    return out


def curve_label(variant: str, axis: str) -> str:
    """``ce`` for the guidance curve, ``ce (temperature)`` for another axis's."""
    return variant if axis == "guidance" else f"{variant} ({axis})"


def split_axes(sweeps: dict[str, dict[int, dict]]) -> dict[str, dict[int, dict]]:
    """One sweep-like entry per curve: each variant's guidance rows under its name, its
    temperature rows (if any) under ``<variant> (temperature)``."""
    out: dict[str, dict[int, dict]] = {}
    for axis in AXES:
        for v, by_seed in sweeps.items():
            for s, sweep in by_seed.items():
                rows = axis_rows(sweep)[axis]
                if rows:
                    out.setdefault(curve_label(v, axis), {})[s] = {**sweep, "axis": axis, "rows": rows}
    return out


def pairs() -> list[tuple[str, str, str, str, str]]:
    """Per matched pair: (quality key, diversity key, name of the value at matched
    quality, both figures in words), the words from the metrics' declarations."""
    words = {m.key: m.words for m in report.METRICS}
    return [(q, o, f"{o}_at_{q}", words[q], words[o]) for q, o in MATCHED]


def curve_keys() -> list[str]:
    """The figures averaged per guidance value: FID (the third panel), the pairs', then
    any other metric declared a curve."""
    return metrics.curve_keys(report.METRICS, ["fid", *(k for pair in MATCHED for k in pair)])


def monotone_increasing(values: Sequence[float]) -> np.ndarray:
    """The least-squares non-decreasing fit (pool adjacent violators, equal weights)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return np.concatenate([np.full(int(c), s / c) for s, c in blocks]) if blocks else np.array([])


def curve(rows: Sequence[dict], quality: str, other: str, axis: str = "guidance"
          ) -> tuple[np.ndarray, np.ndarray]:
    """(fitted quality, measured other) along the axis (guidance up, temperature down),
    over the rows where both exist."""
    field, sign = AXES[axis]
    kept = [r for r in sorted(rows, key=lambda r: sign * r[field])
            if r.get(quality) is not None and r.get(other) is not None]
    return (monotone_increasing([r[quality] for r in kept]),
            np.array([r[other] for r in kept], dtype=float))


def reached(quality: np.ndarray) -> tuple[float, float] | None:
    """The quality range a fitted (non-decreasing) curve covers."""
    return (float(quality[0]), float(quality[-1])) if len(quality) else None


def value_at(quality: np.ndarray, other: np.ndarray, level: float, tol: float = 1e-12
             ) -> float | None:
    """``other`` at fitted quality ``level``, interpolated linearly along the curve;
    None outside the range the curve reaches (no extrapolation)."""
    if not len(quality) or level < quality[0] - tol or level > quality[-1] + tol:
        return None
    at = np.abs(quality - level) <= tol
    if at.any():
        return float(other[at].mean())
    i = int(np.searchsorted(quality, level, side="right"))  # quality[i-1] < level < quality[i]
    t = (level - quality[i - 1]) / (quality[i] - quality[i - 1])
    return float(other[i - 1] + t * (other[i] - other[i - 1]))


def common_range(ranges: Sequence[tuple[float, float] | None]) -> tuple[float, float] | None:
    """The quality range every curve reaches; None when they do not overlap."""
    if not ranges or any(r is None for r in ranges):
        return None
    low, high = max(r[0] for r in ranges), min(r[1] for r in ranges)
    return (low, high) if low <= high else None


def match_level(ranges: Sequence[tuple[float, float] | None], fixed: float | None = None) -> dict:
    """The matched quality: ``fixed`` when given, else the midpoint of the common range
    (None when the curves share no range). Also returns the range and the rule used."""
    common = common_range(ranges)
    if fixed is not None:
        return {"level": fixed, "rule": "fixed in params", "common": common}
    if common is None:
        return {"level": None, "rule": "no range common to every run", "common": None}
    return {"level": (common[0] + common[1]) / 2, "rule": "midpoint of the common range",
            "common": common}


def mean_curves(by_seed: dict[int, dict]) -> list[dict]:
    """Per axis value (guidance, or temperature) reached by every seed: mean and sd (None
    for one seed) of each curve figure over the seeds, in the curve's order."""
    seeds = sorted(by_seed)
    field, sign = AXES[by_seed[seeds[0]].get("axis", "guidance")]
    grids = [{r[field]: r for r in by_seed[s]["rows"]} for s in seeds]
    out, keys = [], curve_keys()
    for g in sorted(set.intersection(*(set(grid) for grid in grids)), key=lambda g: sign * g):
        row = {"guidance": grids[0][g]["guidance"], field: g,
               "n_samples": sorted({grid[g]["n_samples"] for grid in grids})}
        for key in keys:
            values = [grid[g].get(key) for grid in grids]
            if any(v is None for v in values):
                row[key] = row[f"{key}_sd"] = None
                continue
            row[key] = statistics.fmean(values)
            row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(row)
    return out


def grid_levels(common: tuple[float, float] | None, fixed: float | None = None) -> list[float]:
    """The levels a pair is read at: ``fixed`` alone when given, else ``GRID`` evenly
    spaced levels across the common range (one when it is a point, none without one)."""
    if fixed is not None:
        return [fixed]
    if common is None:
        return []
    return [float(x) for x in np.linspace(common[0], common[1], GRID if common[1] > common[0] else 1)]


def paired_at_pair_level(curves: dict, baseline: str, fixed: dict[str, float | None]
                         ) -> dict[str, dict[str, dict | None]]:
    """Per variant and figure: variant - baseline, seed by seed, averaged over a grid of
    quality levels across the range common to the two variants' seeds (or at the level
    fixed in params). One global level often does not exist (a sharper variant's whole
    curve can lie above a softer one's), a pair's range usually does; reading the whole
    range says whether the gap holds along it, not only at one point."""
    out = {}
    for v in curves:
        if v == baseline:
            continue
        out[v] = {}
        seeds = sorted(set(curves[v]) & set(curves[baseline]))
        for quality, _, name, *_ in pairs():
            common = common_range([reached(curves[w][s][quality][0]) for w in (v, baseline)
                                   for s in seeds])
            levels = grid_levels(common, fixed.get(quality))
            gaps = []
            for s in seeds:
                reads = [(value_at(*curves[v][s][quality], x), value_at(*curves[baseline][s][quality], x))
                         for x in levels]
                if levels and all(a is not None and b is not None for a, b in reads):
                    gaps.append(statistics.fmean(a - b for a, b in reads))
            out[v][name] = None if not seeds or len(gaps) < len(seeds) else {
                **t_interval(gaps), "p": t_test_p(gaps), "seeds": seeds, "values": gaps,
                "range": [levels[0], levels[-1]], "levels": len(levels)}
    return out


def summarize(sweeps: dict[str, dict[int, dict]], baselines: Sequence[str],
              fixed: dict[str, float | None] | None = None) -> dict:
    """sweeps[variant][seed] = one sweep file -> levels, per-curve values at matched
    quality (per seed, mean and t-interval), paired differences with each baseline
    present (``ce (temperature)`` may be one), the mean curves and the truncation table.
    A curve is a variant's guidance rows, or its temperature rows (``split_axes``)."""
    fixed = fixed or {}
    truncated = truncation(sweeps)
    sweeps = split_axes(sweeps)
    curves = {v: {s: {q: curve(sw["rows"], q, o, sw["axis"]) for q, o, *_ in pairs()}
                  for s, sw in by_seed.items()} for v, by_seed in sweeps.items()}
    levels, values = {}, {v: {s: {} for s in by_seed} for v, by_seed in sweeps.items()}
    for quality, _, name, *_ in pairs():
        ranges = [reached(c[quality][0]) for by_seed in curves.values() for c in by_seed.values()]
        levels[quality] = match_level(ranges, fixed.get(quality))
        level = levels[quality]["level"]
        for v, by_seed in curves.items():
            for s, c in by_seed.items():
                values[v][s][name] = None if level is None else value_at(*c[quality], level)
    names = [name for _, _, name, *_ in pairs()]
    variants = {}
    for v, by_seed in sweeps.items():
        seeds = sorted(by_seed)
        entry = {"seeds": seeds,
                 "n_samples": sorted({r["n_samples"] for s in seeds for r in by_seed[s]["rows"]}),
                 "feature_extractor": sorted({by_seed[s]["feature_extractor"] for s in seeds}),
                 "axis": by_seed[seeds[0]]["axis"],
                 "guidance": sorted({r["guidance"] for s in seeds for r in by_seed[s]["rows"]}),
                 "temperature": sorted({r.get("temperature", by_seed[s].get("temperature"))
                                        for s in seeds for r in by_seed[s]["rows"]} - {None}),
                 "reached": {}}
        for quality, *_ in pairs():
            entry["reached"][quality] = common_range([reached(curves[v][s][quality][0]) for s in seeds])
        for name in names:
            per_seed = [values[v][s][name] for s in seeds]
            entry[name] = {**(t_interval(per_seed) if None not in per_seed else
                              {"mean": None, "low": None, "high": None, "n": len(seeds)}),
                           "values": per_seed}
        variants[v] = entry
    paired = {b: paired_at_pair_level(curves, b, fixed) for b in baselines if b in curves}
    return {"levels": levels, "variants": variants, "paired": paired,
            "curves": {v: mean_curves(by_seed) for v, by_seed in sweeps.items()},
            "truncation": truncated}


def _setting(row: dict) -> str:
    return f"top-k {row.get('top_k')}, top-p {row.get('top_p')}"


def truncation(sweeps: dict[str, dict[int, dict]]) -> dict[str, dict[str, dict]]:
    """Per variant with truncation rows, per setting (``top-k K, top-p P``, plus
    ``untruncated``: its guidance row at the same guidance): the guidance and, per curve
    figure, the values per seed and their mean and sd (seeds that have both rows)."""
    out = {}
    for v, by_seed in sweeps.items():
        rows = {s: axis_rows(sw) for s, sw in by_seed.items()}
        settings: dict[str, dict[int, dict]] = {}
        for s, axes in rows.items():
            for row in axes[TRUNCATION]:
                plain = next((r for r in axes["guidance"] if r["guidance"] == row["guidance"]), None)
                if plain is not None:
                    settings.setdefault("untruncated", {})[s] = plain
                    settings.setdefault(_setting(row), {})[s] = row
        if not settings:
            continue
        out[v] = {}
        for name, per_seed in settings.items():
            entry = {"seeds": sorted(per_seed),
                     "guidance": sorted({r["guidance"] for r in per_seed.values()})}
            for key in curve_keys():
                values = [per_seed[s].get(key) for s in sorted(per_seed)]
                ok = None not in values
                entry[key] = {"values": values, "mean": statistics.fmean(values) if ok else None,
                              "sd": statistics.stdev(values) if ok and len(values) > 1 else None}
            out[v][name] = entry
    return out


# -- the table ------------------------------------------------------------------

def _cell(entry: dict | None) -> str:
    if entry is None or entry["mean"] is None:
        return "n/a"
    if entry["low"] is None:
        return f"{entry['mean']:.3g}"
    return f"{entry['mean']:.3g} [{entry['low']:.3g}, {entry['high']:.3g}]"


def _range(r: tuple[float, float] | None) -> str:
    return "none" if r is None else f"{r[0]:.3g}–{r[1]:.3g}"


def _level_title(quality_title: str, level: dict) -> str:
    return f"@ {quality_title} {level['level']:.3g}" if level["level"] is not None \
        else f"@ {quality_title} (no common level)"


def markdown(summary: dict) -> str:
    levels, variants = summary["levels"], summary["variants"]
    guidance = sorted({g for e in variants.values() if e["axis"] == "guidance" for g in e["guidance"]})
    hot = sorted({t for e in variants.values() if e["axis"] == "temperature" for t in e["temperature"]})
    n = sorted({k for e in variants.values() for k in e["n_samples"]})
    temperature = "" if not hot else (
        f"; sampling-temperature sweep {', '.join(f'{t:g}' for t in hot)} at the sample guidance "
        "(curves labelled '(temperature)', ordered from hot to cold)")
    lines = ["# Compared at equal quality: guidance frontiers", "",
             f"Guidance sweep {', '.join(f'{g:g}' for g in guidance)}{temperature}; N = "
             f"{', '.join(map(str, n))} samples per point; features: "
             f"{', '.join(sorted({f for e in variants.values() for f in e['feature_extractor']}))}.",
             "Each run's quality is fitted non-decreasing along the guidance order; the "
             "diversity figure is read at the matched quality by linear interpolation between "
             "neighbouring guidance values (no extrapolation), on each seed's own curve.", ""]
    for quality, _, _, q_title, o_title in pairs():
        lv = levels[quality]
        where = "" if lv["common"] is None else f"; range every run reaches: {_range(lv['common'])}"
        level = "none" if lv["level"] is None else f"{lv['level']:.4g}"
        lines.append(f"- {o_title} at matched {q_title}: level {level} ({lv['rule']}{where})")
    head = ["variant", "seeds"]
    for quality, _, _, q_title, o_title in pairs():
        head += [f"{o_title} {_level_title(q_title, levels[quality])} ↑", f"{q_title} reached"]
    lines += ["", "Mean [95 % t-interval] over seeds; 'reached': the quality range all the "
              "variant's seeds cover.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, e in variants.items():
        row = [v, ",".join(map(str, e["seeds"]))]
        for quality, _, name, *_ in pairs():
            row += [_cell(e[name]), _range(e["reached"][quality])]
        lines.append("| " + " | ".join(row) + " |")
    for baseline, by_variant in summary["paired"].items():
        head = [f"variant − {baseline}", "seeds"] + [
            f"{o_title} over matched {q_title} (range)" for quality, _, _, q_title, o_title in pairs()]
        lines += ["", f"### Paired with `{baseline}` (same seed)", "",
                  f"Mean difference [95 % t-interval over seeds], read at {GRID} evenly spaced "
                  "quality levels across the range both variants' seeds reach (after the cell) "
                  "and averaged over them, seed by seed; * the interval excludes 0.", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for v, cells in by_variant.items():
            seeds = next((c["seeds"] for c in cells.values() if c is not None), [])
            row = [v, ",".join(map(str, seeds))]
            row += [paired_cell(cells[name]) + ("" if cells[name] is None else
                                                 f" over {_range(cells[name]['range'])}")
                    for _, _, name, *_ in pairs()]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines + truncation_markdown(summary.get("truncation") or {})) + "\n"


def truncation_markdown(table: dict[str, dict[str, dict]]) -> list[str]:
    """Untruncated against truncated sampling (top-k / top-p) at the same guidance."""
    if not table:
        return []
    keys = curve_keys()
    words = {m.key: m.heading for m in report.METRICS}
    head = ["variant", "sampling", "guidance", "seeds"] + [words.get(k, k) for k in keys]
    lines = ["", "### Truncated sampling", "", "Each variant sampled untruncated and truncated "
             "(top-k, top-p) at the same guidance; mean ± sd over seeds.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, settings in table.items():
        for name, e in settings.items():
            row = [v, name, ",".join(f"{g:g}" for g in e["guidance"]), ",".join(map(str, e["seeds"]))]
            row += ["n/a" if e[k]["mean"] is None else f"{e[k]['mean']:.3g}" + (
                "" if e[k]["sd"] is None else f" ± {e[k]['sd']:.2g}") for k in keys]
            lines.append("| " + " | ".join(row) + " |")
    return lines


# -- the figure -----------------------------------------------------------------

def frontier_figure(summary: dict, annotate: str | None = None):
    """Three panels, one curve per variant (mean over seeds, bars: ±1 sd over seeds):
    precision vs recall, class accuracy vs within-class diversity, FID vs guidance.
    A variant's temperature curve: dashed, its colour, points labelled with the
    temperature. Dotted lines: the matched quality levels. ``annotate``: the variant
    whose points are labelled with their guidance value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    bases = list(dict.fromkeys(v.split(" (")[0] for v in summary["curves"]))
    for v, rows in summary["curves"].items():
        color = f"C{bases.index(v.split(' (')[0]) % 10}"
        style = "-" if summary["variants"][v]["axis"] == "guidance" else "--"
        for ax, (quality, other, _, q_title, o_title) in zip(axes[:2], pairs(), strict=True):
            pts = [r for r in rows if r[quality] is not None and r[other] is not None]
            if not pts:
                continue
            ax.errorbar([r[quality] for r in pts], [r[other] for r in pts],
                        xerr=[r[f"{quality}_sd"] or 0 for r in pts],
                        yerr=[r[f"{other}_sd"] or 0 for r in pts],
                        color=color, marker="o", ms=4, capsize=2, label=v, ls=style)
            if v == annotate or style == "--":
                field = "guidance" if style == "-" else "temperature"
                for r in pts:
                    ax.annotate(f"{'T ' * (style == '--')}{r[field]:g}", (r[quality], r[other]),
                                fontsize=7, textcoords="offset points", xytext=(3, 3), color=color)
            ax.set_xlabel(f"{q_title} →")
            ax.set_ylabel(f"{o_title} →")
        if style == "--":  # one guidance value: no FID-vs-guidance curve
            continue
        g = np.array([r["guidance"] for r in rows])
        fid = np.array([np.nan if r["fid"] is None else r["fid"] for r in rows])
        sd = np.array([0.0 if r["fid_sd"] is None else r["fid_sd"] for r in rows])
        axes[2].plot(g, fid, color=color, marker="o", ms=4, label=v)
        axes[2].fill_between(g, fid - sd, fid + sd, color=color, alpha=0.15, lw=0)
    for ax, (quality, _, _, q_title, o_title) in zip(axes[:2], pairs(), strict=True):
        ax.set_title(f"{q_title} vs {o_title}")
        level = summary["levels"][quality]["level"]
        if level is not None:
            ax.axvline(level, color="0.4", ls=":", lw=1)
            ax.text(level, 1.0, f" matched {level:.3g}", transform=ax.get_xaxis_transform(),
                    va="top", fontsize=7, color="0.3")
    axes[2].set_xlabel("guidance scale")
    fid_metric = next(m for m in report.METRICS if m.key == "fid")
    axes[2].set_ylabel(fid_metric.heading)
    axes[2].set_title(f"{fid_metric.title} vs guidance")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
