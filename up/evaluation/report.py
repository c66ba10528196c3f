"""The comparison: one table over variants (rows) and metrics (columns), paired
differences to the baselines (95 % t-intervals, paired t-test p-values, Holm over the
confirmatory family), the dose of each loss term and the training compute, and the
selective-generation tables (figures: up/evaluation/figures.py; dose-response:
up/evaluation/dose.py). The runs come from the pipeline's files (``pipeline_runs``) or
from a study folder, whichever runs it holds (``study_runs``); the README's study
blocks are rewritten from this markdown (``rewrite_readme``).

With several training seeds a cell is mean +- sample standard deviation over
the seeds; the seeds and sample counts are printed beside the numbers, since
FID and friends are only comparable at equal N.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from pathlib import Path

import yaml

from up.core import paths
from up.core.params import POST_HOC_LOSS, post_hoc_run
from up.evaluation import calibration, editing, fidelity, selective
from up.evaluation.metrics import (
    Metric,
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
# The editing table's columns (metrics/edit-*.json), a table of its own.
EDIT_METRICS = register(editing.METRICS)


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


def t_test_p(values: Sequence[float]) -> float | None:
    """Two-sided one-sample t-test p-value of mean 0 (the paired t-test when the values
    are differences); None under 2 values, and None when the values are all equal: with
    no spread there is no test (every value 0: two runs that share a figure by
    construction, as ``ce+ts`` samples ``ce``'s images; the same non-zero value, as a
    class accuracy 0.003 lower in both of 2 seeds: t would be infinite and p 0, an
    artefact of a discrete figure and few seeds), and counting it would only change the
    Holm family."""
    from scipy.stats import t

    n = len(values)
    if n < 2:
        return None
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    if sd == 0:
        return None
    return float(2 * t.sf(abs(mean) / (sd / n ** 0.5), n - 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (controls the family-wise error rate): the i-th
    smallest of m p-values is multiplied by m - i + 1, capped at 1, and made
    non-decreasing along that order. Returned in the input's order."""
    m, adjusted, running = len(p_values), [0.0] * len(p_values), 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def adjust_family(paired: dict[str, dict[str, dict]], members: Sequence[str]) -> int:
    """Holm over the confirmatory family: every paired cell (baseline, variant, key) with
    a p-value whose variant is in ``members``; a pair compared both ways (ce+ts - ce and
    ce - ce+ts) is one comparison. Writes ``p_holm`` into the cells (None outside the
    family) and returns the family's size."""
    family: dict[tuple, list[dict]] = {}
    for baseline, by_variant in paired.items():
        for variant, cells in by_variant.items():
            for key, cell in cells.items():
                if cell is None:
                    continue
                cell["p_holm"] = None
                if variant in members and cell.get("p") is not None:
                    family.setdefault((frozenset((baseline, variant)), key), []).append(cell)
    adjusted = holm([cells[0]["p"] for cells in family.values()])
    for cells, p in zip(family.values(), adjusted, strict=True):
        for cell in cells:
            cell["p_holm"] = p
    return len(family)


def paired_differences(runs: dict[str, dict[int, dict]], baseline: str,
                       keys: Sequence[str]) -> dict[str, dict[str, dict]]:
    """For every other variant, per key: the differences variant - baseline seed by
    seed (same training seed: same data order, same sampling seed), their mean,
    95 % t-interval and two-sided paired t-test p-value. Only the seeds both ran are
    paired."""
    out = {}
    for variant, by_seed in runs.items():
        if variant == baseline:
            continue
        seeds = sorted(set(by_seed) & set(runs[baseline]))
        out[variant] = {}
        for key in keys:
            diffs = [by_seed[s].get(key) - runs[baseline][s].get(key) for s in seeds
                     if by_seed[s].get(key) is not None and runs[baseline][s].get(key) is not None]
            out[variant][key] = ({**t_interval(diffs), "p": t_test_p(diffs), "seeds": seeds}
                                 if diffs else None)
    return out


def paired_cell(entry: dict | None) -> str:
    """A paired difference: mean [95 % interval], * where it excludes 0; a difference
    with no spread over the seeds has no interval (shared by construction, or the same
    in every seed) and says so."""
    if entry is None:
        return "n/a"
    if entry["low"] is None:
        return f"{entry['mean']:+.3g}"
    if entry["low"] == entry["high"]:  # no spread over the seeds: no interval, no test
        return "= (equal)" if entry["mean"] == 0 else f"{entry['mean']:+.3g} (every seed)"
    star = "*" if entry["low"] > 0 or entry["high"] < 0 else ""
    return f"{entry['mean']:+.3g} [{entry['low']:+.2g}, {entry['high']:+.2g}]{star}"


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2g}"


def paired_markdown(paired: dict[str, dict[str, dict]], rows: Sequence[str] | None = None,
                    p_values: bool = False, metrics: Sequence[Metric] | None = None,
                    heading: str = "Paired with") -> list[str]:
    """One table per baseline: rows variants (``rows`` only, when given), cells mean
    difference [95 % interval]; * marks an interval that excludes 0. ``p_values``: after
    each, the table of paired t-test p-values with their Holm adjustment. ``metrics``:
    whose paired columns (default the main table's); ``heading``: each table's, before
    the baseline."""
    lines, columns = [], paired_columns(METRICS if metrics is None else metrics)
    for baseline, by_variant in paired.items():
        shown = {v: c for v, c in by_variant.items() if rows is None or v in rows}
        if not shown:
            continue
        head = ["variant − " + baseline, "seeds"] + [title for _, title in columns]
        lines += ["", f"### {heading} `{baseline}`", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for variant, cells in shown.items():
            seeds = next((c["seeds"] for c in cells.values() if c is not None), [])
            row = [variant, ",".join(map(str, seeds))]
            row += [paired_cell(cells[key]) for key, _ in columns]
            lines.append("| " + " | ".join(row) + " |")
        if not p_values:
            continue
        lines += ["", f"p-values, paired with `{baseline}`: two-sided paired t-test (Holm-adjusted)",
                  "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for variant, cells in shown.items():
            seeds = next((c["seeds"] for c in cells.values() if c is not None), [])
            row = [variant, ",".join(map(str, seeds))]
            row += ["n/a" if cells[key] is None else
                    f"{_p(cells[key]['p'])} ({_p(cells[key].get('p_holm'))})" for key, _ in columns]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def paired_section(paired: dict[str, dict[str, dict]], confirmatory: Sequence[str],
                   family: int) -> list[str]:
    """The paired tables of the confirmatory variants with their p-values (Holm over the
    family, its size stated), then those of the other (exploratory) variants."""
    lines = ["", "## Paired differences over seeds",
             "", "Each cell: mean over seeds of (variant − baseline) with the same training "
             "seed (same data order and sampling seed), and its 95 % Student-t interval "
             "(n − 1 degrees of freedom: t = 12.7 with 2 seeds, 4.30 with 3, 2.78 with 5, so "
             "intervals are wide); * marks an interval that excludes 0; = (equal): equal in "
             "every seed, as when the two runs share the figure by construction (`ce+ts` "
             "samples `ce`'s images); (every seed): the same difference in every seed. "
             "Neither has a spread to test: no p-value, outside the family.", "",
             f"Confirmatory comparisons: {family} (every cell of the tables below with a "
             "p-value, a pair compared both ways counted once). p-values: two-sided paired "
             f"t-test, and in brackets Holm-adjusted over these {family} comparisons.",
             *paired_markdown(paired, confirmatory, p_values=True)]
    others = [v for by_variant in paired.values() for v in by_variant if v not in confirmatory]
    if others:
        lines += ["", "## Exploratory paired differences (outside the Holm family)", "",
                  "The dose-response points other than the selected weight and the ablations: "
                  "the same cells, unadjusted.", *paired_markdown(paired, others)]
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
             paired: dict[str, dict[str, dict]] | None = None,
             confirmatory: Sequence[str] | None = None, preface: Sequence[str] = (),
             sections: Sequence[str] = (), folder: Path = paths.RESULTS) -> str:
    """The report: ``preface`` (which runs), the main table, the paired tables (Holm over
    the ``confirmatory`` variants' cells, default every variant), ``sections`` (the dose
    tables), the selective-generation tables. ``folder``: where its figures are."""
    extractors = sorted({e for v in summary.values() for e in v["feature_extractor"]})
    multi = any(len(v["seeds"]) > 1 for v in summary.values())
    lines = [
        "# Results",
        "",
        *preface,
        f"Feature network for FID/KID/IS/precision/recall: {', '.join(extractors)}. "
        "Generated images are compared with the test split; calibration (ECE, NLL, Brier, "
        "token accuracy) is of the token predictions on the val tokens. Figures under "
        f"{folder}/ show the first seed of each variant.",
        "",
        ("Cells are mean ± sample std over the listed training seeds."
         if multi else "One training seed per variant: cells are single values."),
        "",
        *_table(summary, main_columns(METRICS)),
    ]
    if confirmatory is not None and set(confirmatory) != set(summary):
        lines += ["", "## Confirmatory set", "",
                  "The runs compared with Holm's adjustment: every run but the dose-response "
                  "points off the selected weight and the ablations at it (exploratory). "
                  + ("Cells: mean ± sample std over the listed seeds. " if multi else "")
                  + "Paired differences and p-values: the next section.", "",
                  *_table({v: summary[v] for v in confirmatory}, main_columns(METRICS))]
    if paired:
        members = list(summary) if confirmatory is None else list(confirmatory)
        lines += paired_section(paired, members, adjust_family(paired, members))
    lines += sections
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
             "token) of the conditional one; `_coarse` / `_fine`: mean over the first half of "
             "the scales / the rest. "
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


# -- editing: its own table over variants and seeds, paired with the baselines ------

def edit_keys() -> list[str]:
    """The keys of metrics/edit-*.json the editing table aggregates over seeds."""
    return summary_keys(EDIT_METRICS)


def edit_section(edits: dict[str, dict[int, dict]], compared: Sequence[str]
                 ) -> tuple[dict, dict, list[str]]:
    """(summary, paired differences, markdown) of the runs' edit metrics
    (edits[variant][seed]): one table over variants, with several seeds the paired
    differences to each of ``compared`` that has edits (exploratory: no p-values)."""
    summary = aggregate(edits, edit_keys())
    several = any(len(by_seed) > 1 for by_seed in edits.values())
    paired = {b: paired_differences(edits, b, [k for k, _ in paired_columns(EDIT_METRICS)])
              for b in compared if b in edits} if several else {}
    columns = main_columns(EDIT_METRICS)
    head = ["variant", "seeds", "N fills / N images"] + [title for _, title in columns]
    lines = ["", "## Editing", "",
             "Test images in-painted, out-painted and class-edited by sampling with the known "
             "tokens forced (`edit`, figure `editing.png`). Class accuracy is for the "
             "requested class; realism against the real training images of that class; "
             "known PSNR of the decoded known region against the original (recon PSNR: the "
             "tokenizer's reconstruction over the same pixels); fill diversity: mean pairwise "
             "feature distance of one image's fills; repetition: feature similarity of the "
             "out-painted half to the known half or its mirror image (real: the original's "
             "halves); Spearman and AUROC: whether the uncertainty map predicts where the "
             "fills disagree (top-decile pixel variance), beside the shuffled-map control. "
             "Several seeds: mean ± std; one seed: value [bootstrap 95 % interval over images].",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, entry in summary.items():
        metrics = entry["metrics"]
        counts = (f"{'/'.join(map(str, entry['n_samples']))} / "
                  f"{'/'.join(map(str, entry['n_real']))}")
        cells = [variant, ",".join(map(str, entry["seeds"])), counts]
        cells += [_selective_cell(metrics[key], metrics.get(f"{key}_lo"), metrics.get(f"{key}_hi"))
                  for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += paired_markdown(paired, metrics=EDIT_METRICS, heading="Editing, paired with")
    return summary, paired, lines


# -- where the runs come from: the pipeline's files or a study folder ----------------

RUN_FOLDER = re.compile(r"(?P<variant>.+)-s(?P<seed>\d+)")


def _json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None


def pipeline_runs(settings: dict[str, dict], seeds: Sequence[int]) -> dict[str, dict[int, dict]]:
    """runs[variant][seed] of the pipeline's files: eval, train, sweep and edit (metrics/;
    None where absent), the variant's ``settings`` (its params.yaml section) and its
    plots/eval folder."""
    return {v: {s: {"eval": _json(paths.metrics(f"eval-{paths.run_tag(v, s)}")),
                    "train": _json(paths.metrics(f"train-{paths.run_tag(v, s)}")),
                    "sweep": _json(paths.sweep(v, s)),
                    "edit": _json(paths.metrics(f"edit-{paths.run_tag(v, s)}")),
                    "settings": settings[v],
                    "plots": paths.eval_plots(v, s)} for s in seeds} for v in settings}


def study_profiles(folder: Path) -> list[dict]:
    """The profiles the study ran (results/<study>/profiles/*.yaml, which `up study` copies
    there: a dose-response and a confirmatory set, say), in name order; [] when none."""
    return [yaml.safe_load(path.read_text()) or {}
            for path in sorted((Path(folder) / "profiles").glob("*.yaml"))]


def declared_runs(profiles: Sequence[dict]) -> dict[str, dict]:
    """Every run the profiles declare with its settings: variants, derived, then the
    ``<name>+ts`` run of each post_hoc entry (up.core.params.Params.runs, on the raw files)."""
    runs: dict[str, dict] = {}
    for profile in profiles:
        post_hoc = {post_hoc_run(n): {"loss": POST_HOC_LOSS} for n in profile.get("post_hoc") or []}
        runs.update({**(profile.get("variants") or {}), **(profile.get("derived") or {}),
                     **post_hoc})
    return runs


def expected_runs(profiles: Sequence[dict]) -> list[tuple[str, int]]:
    """(variant, seed) of every run some profile declares, with each of that profile's seeds."""
    expected = [(n, s) for profile in profiles for n in declared_runs([profile])
                for s in profile.get("seeds") or []]
    return list(dict.fromkeys(expected))


def study_teacher(profiles: Sequence[dict], default: str) -> str:
    """The teacher the study's profiles name (the default when they name none)."""
    named = {p["teacher"] for p in profiles if p.get("teacher")}
    if len(named) > 1:
        raise ValueError(f"the study's profiles name different teachers: {sorted(named)}")
    return named.pop() if named else default


def study_runs(folder: Path, profiles: Sequence[dict] = ()) -> dict[str, dict[int, dict]]:
    """runs[variant][seed] of results/<study>/runs/<variant>-s<seed>/: its eval, train,
    sweep and edit files (None where absent), its settings (params.json's variant section, else
    the profile's) and its eval folder; variants in the profile's order, then the rest."""
    declared = declared_runs(profiles)
    found: dict[str, dict[int, dict]] = {}
    for folder_ in sorted((Path(folder) / "runs").glob("*")):
        match = RUN_FOLDER.fullmatch(folder_.name)
        if not folder_.is_dir() or match is None:
            continue
        variant, seed = match["variant"], int(match["seed"])
        settings = (_json(folder_ / paths.STUDY_PARAMS) or {}).get("loss") or declared.get(variant)
        found.setdefault(variant, {})[seed] = {
            "eval": _json(folder_ / paths.STUDY_EVAL), "train": _json(folder_ / paths.STUDY_TRAIN),
            "sweep": _json(folder_ / paths.STUDY_SWEEP), "edit": _json(folder_ / paths.STUDY_EDIT),
            "settings": settings or {},
            "plots": folder_ / paths.STUDY_EVAL_PLOTS}
    order = [n for n in declared if n in found] + sorted(set(found) - set(declared))
    return {v: dict(sorted(found[v].items())) for v in order}


def present(runs: dict[str, dict[int, dict]], part: str) -> dict[str, dict[int, dict]]:
    """runs[variant][seed][part] for the runs that have that file (variants without any
    left out)."""
    out = {v: {s: r[part] for s, r in by_seed.items() if r[part] is not None}
           for v, by_seed in runs.items()}
    return {v: by_seed for v, by_seed in out.items() if by_seed}


def runs_markdown(runs: dict[str, dict[int, dict]], expected: Sequence[tuple[str, int]],
                  source: str, part: str = "eval") -> list[str]:
    """Which runs the tables read (those with their ``part`` file) and which of the
    ``expected`` ones are missing, said plainly."""
    have = {(v, s) for v, by_seed in present(runs, part).items() for s in by_seed}
    missing = [paths.run_tag(v, s) for v, s in expected if (v, s) not in have]
    lines = [f"Runs read from {source}: {len(have)}"
             + (f" of the {len(expected)} the study's profiles declare." if expected else ".")]
    lines += [f"- `{v}`: seeds {', '.join(map(str, sorted(s for w, s in have if w == v)))}"
              for v in runs if any(w == v for w, _ in have)]
    if expected:
        lines.append(f"- missing: {', '.join(f'`{t}`' for t in missing)}" if missing
                     else "- missing: none")
    return [*lines, ""]


def baselines(teacher: str, settings: dict[str, dict]) -> list[str]:
    """The paired tables' baselines among the runs: the teacher, its temperature-scaled
    versions (loss ``ts``, not named after another run: ``ce+ts``, ``ce+ts-sampler``) and
    the distillation control (loss ``kd``)."""
    others = [n for n in settings if n != teacher]

    def scaled_teacher(name: str) -> bool:
        return settings[name].get("loss") == "ts" and not any(
            name.startswith(f"{o}+") for o in others if o != name)

    return [n for n in settings
            if n == teacher or scaled_teacher(n) or settings[n].get("loss") == "kd"]


# -- the dose of each term and the training compute ----------------------------------

# train.json `dose`: the mean of each weighted term over the end of training
TERMS = [("disp", "λ_disp·L_disp"), ("se", "λ_se·L_SE"), ("kd", "λ_kd·KL")]


def _mean(values: Sequence[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else statistics.fmean(values)


def dose_table(train: dict[str, dict[int, dict]], teacher: str) -> dict[str, dict]:
    """Per variant (train[variant][seed] = its train.json): the CE at the end of training,
    each weighted term's ratio to it, and the training compute (total GFLOP, student plus
    teacher, and its ratio to the teacher's), means over seeds; None where not recorded."""
    out = {}
    for variant, by_seed in train.items():
        doses = [t.get("dose") or {} for t in by_seed.values()]
        entry = {"seeds": sorted(by_seed), "ce": _mean([d.get("ce") for d in doses])}
        for term, _ in TERMS:
            ratios = [None if d.get(term) is None or not d.get("ce") else d[term] / d["ce"]
                      for d in doses]
            entry[f"{term}_to_ce"] = _mean(ratios) if any(d.get(term) is not None for d in doses) \
                else None
        entry["total_gflop"] = _mean([(t.get("compute") or {}).get("total_gflop")
                                      for t in by_seed.values()])
        out[variant] = entry
    base = out.get(teacher, {}).get("total_gflop")
    for entry in out.values():
        entry["gflop_to_teacher"] = (None if entry["total_gflop"] is None or not base
                                     else entry["total_gflop"] / base)
    return out


def _num(value: float | None, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def dose_markdown(doses: dict[str, dict], teacher: str) -> list[str]:
    """The dose table: how large each weighted term is next to the CE it is added to."""
    head = ["variant", "seeds", "CE (end)"] + [f"{t} / CE" for _, t in TERMS] + [
        "train GFLOP", f"× `{teacher}`"]
    lines = ["", "## Dose of each term and training compute", "",
             "Each weighted term's mean over the end of training (train.json `dose`) divided "
             "by the CE it is added to, mean over seeds; training compute: student plus "
             f"frozen teacher, in GFLOP, and relative to `{teacher}`. n/a: not recorded.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, e in doses.items():
        row = [variant, ",".join(map(str, e["seeds"])), _num(e["ce"], ".4g")]
        row += [_num(e[f"{term}_to_ce"]) for term, _ in TERMS]
        row += [_num(e["total_gflop"], ".4g"), _num(e["gflop_to_teacher"])]
        lines.append("| " + " | ".join(row) + " |")
    return lines


# -- the README's study tables are the report's own markdown -------------------------

README_BLOCK = re.compile(r"(?P<open><!-- study:(?P<name>[^:\s]+):(?P<part>[^>]*?) -->\n)"
                          r".*?(?P<close><!-- /study -->)", re.S)


def report_part(folder: Path, part: str) -> str:
    """``summary`` (results/<study>/summary.md without its title line), ``frontier``, or
    one section of either: ``summary#Paired differences over seeds`` (its heading line
    through the line before the next heading of the same or a higher level)."""
    name, _, heading = part.partition("#")
    path = Path(folder) / f"{name}.md"
    if not path.is_file():
        raise FileNotFoundError(f"README block study:{part}: {path} does not exist")
    lines = path.read_text().splitlines()
    if not heading:
        return "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines).strip("\n")
    starts = [i for i, line in enumerate(lines) if line.lstrip("#") == f" {heading}"
              and line.startswith("#")]
    if not starts:
        raise FileNotFoundError(f"README block study:{part}: no heading {heading!r} in {path}")
    level = len(lines[starts[0]]) - len(lines[starts[0]].lstrip("#"))
    end = next((j for j in range(starts[0] + 1, len(lines))
                if re.match(rf"#{{1,{level}}} ", lines[j])), len(lines))
    return "\n".join(lines[starts[0]:end]).strip("\n")


def rewrite_readme(text: str, results: Path = paths.RESULTS) -> str:
    """``text`` with every ``<!-- study:NAME:PART -->`` ... ``<!-- /study -->`` block
    holding ``report_part(results/NAME, PART)`` (headings two levels down): the README's
    tables are generated."""
    def block(m: re.Match) -> str:
        part = _nested(report_part(Path(results) / m["name"], m["part"]))
        return f"{m['open']}\n{part}\n\n{m['close']}"

    return README_BLOCK.sub(block, text)


def _nested(markdown: str) -> str:
    """The report's headings two levels down, so a block sits inside the README's
    ``### <study>`` section instead of starting sections of its own."""
    return re.sub(r"^(#+) ", r"##\1 ", markdown, flags=re.M)
