"""report: one table over all declared variants x seeds, and the figures, under results/."""

from __future__ import annotations

import json
from pathlib import Path

from up.core import paths
from up.core.errors import StageError
from up.core.io import save_figure, save_json, save_text
from up.core.params import Params
from up.evaluation.figures import grids_figure, reliability_figure, risk_coverage_figure
from up.evaluation.report import (
    aggregate,
    headline,
    markdown,
    paired_differences,
    paired_keys,
    report_keys,
)


def _read_json(path: Path):
    return json.loads(path.read_text())


def run(params: Params) -> None:
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

    runs = {v: {s: _read_json(paths.metrics(f"eval-{paths.run_tag(v, s)}")) for s in params.seeds}
            for v in params.runs}
    summary = aggregate(runs, report_keys())
    fractions = {r.get("selective_fraction") for by_seed in runs.values() for r in by_seed.values()}
    fraction = fractions.pop() if len(fractions) == 1 else None
    baselines = [params.teacher] + [n for n, v in params.derived.items() if v.loss == "ts"]
    paired = {b: paired_differences(runs, b, paired_keys())
              for b in baselines if b in runs} if len(params.seeds) > 1 else {}
    save_text(markdown(summary, fraction, paired), paths.SUMMARY_MD)
    save_json({"variants": summary, "paired": paired}, paths.SUMMARY_JSON)
    save_json(headline(summary), paths.HEADLINE_JSON)

    save_figure(samples, paths.SAMPLES_FIGURE)
    save_figure(reliability_figure({n: _read_json(p / paths.RELIABILITY_JSON)
                                    for n, p in plots.items()}), paths.RELIABILITY_FIGURE)
    # results/selective.png: within-class risk-coverage curves of the failure rate
    save_figure(risk_coverage_figure({n: _read_json(p / paths.RISK_COVERAGE_JSON)
                                      for n, p in plots.items()}), paths.RISK_COVERAGE_FIGURE)
    print(paths.SUMMARY_MD.read_text())
