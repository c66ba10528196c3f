"""frontier: every variant compared at equal quality along its guidance sweep.

Reads metrics/sweep-{variant}-s{seed}.json of every declared variant and seed
and writes results/frontier.md (recall at matched precision and within-class
diversity at matched class accuracy, mean and interval over seeds, paired
differences over the range shared with the teacher, its temperature-scaled versions
and the teacher sampled hotter; truncated sampling), results/frontier.json (the same,
the levels and the mean curves) and results/frontier.png (the three frontier panels).
With ``study``: the sweep.json of whichever runs results/<study>/runs/ holds, but the
exploratory ones (a dose-response's other weights, the ablations: the report's dose
tables read those), written into results/<study>/. The rules are in up/evaluation/frontier.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from up.core import paths
from up.core.errors import StageError
from up.core.io import save_figure, save_json, save_text
from up.core.params import Params
from up.evaluation import dose
from up.evaluation.frontier import curve_label, frontier_figure, markdown, summarize
from up.evaluation.report import (
    baselines,
    expected_runs,
    present,
    runs_markdown,
    study_profiles,
    study_runs,
    study_teacher,
)


def run(params: Params, study: str | None = None) -> None:
    fixed = {"precision": params.sweep.match_precision,
             "class_accuracy": params.sweep.match_class_accuracy}
    if study is None:
        files = {v: {s: paths.sweep(v, s) for s in params.seeds} for v in params.runs}
        missing = [str(p) for by_seed in files.values() for p in by_seed.values() if not p.is_file()]
        if missing:
            raise StageError(f"missing inputs: {', '.join(missing)} (run `dvc repro`, or `up sweep` "
                             "for them)")
        sweeps = {v: {s: json.loads(p.read_text()) for s, p in by_seed.items()}
                  for v, by_seed in files.items()}
        settings = {v: s.model_dump() for v, s in params.runs.items()}
        teacher, folder, preface = params.teacher, paths.RESULTS, []
    else:
        folder = paths.study(study)
        profiles = study_profiles(folder)
        runs = study_runs(folder, profiles)
        _, _, exploratory = dose.choose(runs)  # off-selection dose points, ablations
        sweeps = {v: by_seed for v, by_seed in present(runs, "sweep").items() if v not in exploratory}
        if not sweeps:
            raise StageError(f"--study {study}: no run under {folder / 'runs'} has {paths.STUDY_SWEEP}")
        settings = {v: next(iter(by_seed.values()))["settings"] for v, by_seed in runs.items()}
        teacher = study_teacher(profiles, params.teacher)
        preface = runs_markdown(runs, expected_runs(profiles), f"{folder / 'runs'}/", "sweep")
        if exploratory:
            preface += [f"Left out here, as exploratory: {', '.join(f'`{v}`' for v in exploratory)} "
                        "(the dose-response's other weights and the ablations; summary.md's "
                        "dose-response tables read them at matched class accuracy).", ""]
    compared = [b for b in baselines(teacher, settings) if b in sweeps]
    summary = summarize(sweeps, compared + [curve_label(teacher, "temperature")], fixed)
    text = markdown(summary)
    if preface:  # after the title line
        title, _, rest = text.partition("\n")
        text = "\n".join([title, "", *preface]) + rest
    save_text(text, folder / paths.FRONTIER_MD.name)
    save_json(summary, folder / paths.FRONTIER_JSON.name)
    annotate = teacher if teacher in sweeps else next(iter(sweeps))
    save_figure(frontier_figure(summary, annotate=annotate), folder / paths.FRONTIER_FIGURE.name)
    print(Path(folder / paths.FRONTIER_MD.name).read_text())
