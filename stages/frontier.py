"""frontier: every variant compared at equal quality along its guidance sweep.

Reads metrics/sweep-{variant}-s{seed}.json of every declared variant and seed
and writes results/frontier.md (recall at matched precision and within-class
diversity at matched class accuracy, mean and interval over seeds, paired
differences with the teacher and its temperature-scaled versions),
results/frontier.json (the same, the levels and the mean curves) and
results/frontier.png (the three frontier panels). The rules are in up/evaluation/frontier.py.
"""

from __future__ import annotations

import json

from up.core import paths
from up.core.errors import StageError
from up.core.io import save_figure, save_json, save_text
from up.core.params import Params
from up.evaluation.frontier import frontier_figure, markdown, summarize


def run(params: Params) -> None:
    sweeps = {v: {s: paths.sweep(v, s) for s in params.seeds} for v in params.runs}
    missing = [str(p) for by_seed in sweeps.values() for p in by_seed.values() if not p.is_file()]
    if missing:
        raise StageError(f"missing inputs: {', '.join(missing)} (run `dvc repro`, or `up sweep` "
                         "for them)")
    sweeps = {v: {s: json.loads(p.read_text()) for s, p in by_seed.items()}
              for v, by_seed in sweeps.items()}
    baselines = [params.teacher] + [n for n, v in params.derived.items() if v.loss == "ts"]
    fixed = {"precision": params.sweep.match_precision,
             "class_accuracy": params.sweep.match_class_accuracy}
    summary = summarize(sweeps, baselines, fixed)
    save_text(markdown(summary), paths.FRONTIER_MD)
    save_json(summary, paths.FRONTIER_JSON)
    annotate = params.teacher if params.teacher in sweeps else next(iter(sweeps))
    save_figure(frontier_figure(summary, annotate=annotate), paths.FRONTIER_FIGURE)
    print(paths.FRONTIER_MD.read_text())
