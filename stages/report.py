"""report: one table over all runs, the paired comparisons, the dose tables and the
figures. Runs come from the pipeline (every declared variant x seed: metrics/, plots/,
samples/; written under results/) or, with ``study``, from a study folder
(results/<study>/runs/*/, whichever runs are there; written into results/<study>/)."""

from __future__ import annotations

import json
from pathlib import Path

from up.core import paths
from up.core.errors import StageError
from up.core.io import save_figure, save_json, save_text
from up.core.params import Params
from up.evaluation import dose, editing
from up.evaluation.figures import grids_figure, reliability_figure, risk_coverage_figure
from up.evaluation.report import (
    aggregate,
    baselines,
    dose_markdown,
    dose_table,
    edit_section,
    expected_runs,
    headline,
    markdown,
    paired_differences,
    paired_keys,
    pipeline_runs,
    present,
    report_keys,
    rewrite_readme,
    runs_markdown,
    study_profiles,
    study_runs,
    study_teacher,
)


def _read_json(path: Path):
    return json.loads(path.read_text())


def _pipeline(params: Params) -> None:
    first = {v: paths.run_tag(v, params.seeds[0]) for v in params.runs}  # figures: first seed
    grids = {first[v]: paths.samples(v, params.seeds[0]) / paths.GRID for v in params.runs}
    plots = {first[v]: paths.eval_plots(v, params.seeds[0]) for v in params.runs}
    needed = [paths.metrics(f"eval-{paths.run_tag(v, s)}") for v in params.runs for s in params.seeds]
    needed += [p for n in first.values() for p in (grids[n], plots[n] / paths.RELIABILITY_JSON,
                                                   plots[n] / paths.RISK_COVERAGE_JSON)]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise StageError(f"missing inputs: {', '.join(missing)} "
                         "(run `dvc repro`, or `up sample` / `up evaluate` for them)")

    # Before any output is written: the grids' sizes are checked as the figure is drawn.
    samples = grids_figure(grids)
    runs = pipeline_runs({v: s.model_dump() for v, s in params.runs.items()}, params.seeds)
    report(runs, params.teacher, paths.RESULTS)
    save_figure(samples, paths.SAMPLES_FIGURE)


def _study(params: Params, name: str) -> None:
    folder = paths.study(name)
    if not (folder / "runs").is_dir():
        raise StageError(f"--study {name}: {folder / 'runs'} does not exist")
    profiles = study_profiles(folder)
    runs = study_runs(folder, profiles)
    if not present(runs, "eval"):
        raise StageError(f"--study {name}: no run under {folder / 'runs'} has {paths.STUDY_EVAL}")
    preface = runs_markdown(runs, expected_runs(profiles), f"{folder / 'runs'}/")
    report(runs, study_teacher(profiles, params.teacher), folder, preface, study=True)


def report(runs: dict[str, dict[int, dict]], teacher: str, folder: Path,
           preface: list[str] = (), study: bool = False) -> None:
    """Write the report of ``runs`` (``up.evaluation.report.pipeline_runs`` /
    ``study_runs``) into ``folder``: summary.md/.json, metrics.json, the reliability and
    risk-coverage figures (first seed of each confirmatory variant), and with edit
    metrics the editing table and editing.png; a study also its selection.json and
    dose_response.png when it has a dose-response."""
    evals = present(runs, "eval")
    summary = aggregate(evals, report_keys())
    fractions = {r.get("selective_fraction") for by_seed in evals.values() for r in by_seed.values()}
    fraction = fractions.pop() if len(fractions) == 1 else None
    settings = {v: next(iter(by_seed.values()))["settings"] for v, by_seed in runs.items() if v in evals}
    selection, with_eval, exploratory = dose.choose(runs)
    confirmatory = [v for v in evals if v not in exploratory]
    compared = [b for b in baselines(teacher, settings) if b in confirmatory]
    several = any(len(by_seed) > 1 for by_seed in evals.values())
    paired = {b: paired_differences(evals, b, paired_keys()) for b in compared} if several else {}
    doses = dose_table(present(runs, "train"), teacher)
    recorded = any(v is not None for e in doses.values() for k, v in e.items() if k != "seeds")
    sections = dose_markdown(doses, teacher) if recorded else []  # older train files: none
    curves, ablated = {}, {}
    if selection:
        picked = [c["selected_run"] for c in selection.values() if c["loss"] == "kd"]
        references = [b for b in compared if settings[b].get("loss") != "kd"] + picked
        curves = dose.response(with_eval, selection, references)
        sections += dose.markdown(selection, curves)
        ablated = dose.ablation_response(with_eval, selection)
        sections += dose.ablation_markdown(ablated)
    edits = present(runs, "edit")
    edit_summary, edit_paired, edit_lines = edit_section(edits, compared) if edits else ({}, {}, [])
    sections += edit_lines
    text = markdown(summary, fraction, paired, confirmatory, preface, sections, folder)
    save_text(text, folder / paths.SUMMARY_MD.name)
    save_json({"variants": summary, "paired": paired, "confirmatory": confirmatory,
               "dose": doses, "selection": selection, "dose_response": curves,
               "ablations": ablated,
               "edit": {"variants": edit_summary, "paired": edit_paired}},
              folder / paths.SUMMARY_JSON.name)
    save_json(headline(summary), folder / paths.HEADLINE_JSON.name)
    if study and selection:
        save_json(selection, folder / paths.STUDY_SELECTION)
        save_figure(dose.figure(curves), folder / paths.STUDY_DOSE_FIGURE)
    plots = {paths.run_tag(v, min(evals[v])): runs[v][min(evals[v])]["plots"] for v in confirmatory}
    save_figure(reliability_figure({n: _read_json(p / paths.RELIABILITY_JSON)
                                    for n, p in plots.items() if (p / paths.RELIABILITY_JSON).is_file()}),
                folder / paths.RELIABILITY_FIGURE.name)
    # selective.png: within-class risk-coverage curves of the failure rate
    save_figure(risk_coverage_figure({n: _read_json(p / paths.RISK_COVERAGE_JSON) for n, p in plots.items()
                                      if (p / paths.RISK_COVERAGE_JSON).is_file()}),
                folder / paths.RISK_COVERAGE_FIGURE.name)
    if edits:
        save_figure(editing.figure(edits), folder / paths.EDITING_FIGURE.name)
    print(text)


def run(params: Params, study: str | None = None, readme: Path | None = None) -> None:
    if study is None:
        _pipeline(params)
    else:
        _study(params, study)
    if readme is not None:
        save_text(rewrite_readme(Path(readme).read_text()), Path(readme))
