"""report: one table over all declared variants x seeds, and the figures, under results/."""

from __future__ import annotations

import json
from pathlib import Path

from up.core.errors import StageError
from up.core.io import save_figure, save_json, save_text
from up.core.params import Params
from up.evaluation.figures import grids_figure, reliability_figure, risk_coverage_figure
from up.evaluation.report import (
    MAIN_COLUMNS,
    PAIRED_KEYS,
    SELECTIVE_KEYS,
    aggregate,
    headline,
    markdown,
    paired_differences,
)

OUT = Path("results")


def _read_json(path: Path):
    return json.loads(path.read_text())


def run(params: Params) -> None:
    names = {v: [f"{v}-s{s}" for s in params.seeds] for v in params.runs}
    first = {v: ns[0] for v, ns in names.items()}  # figures: the first seed of each variant
    needed = [Path(f"metrics/eval-{n}.json") for ns in names.values() for n in ns]
    needed += [p for n in first.values() for p in (Path("samples") / n / "grid.png",
                                                   Path("plots/eval") / n / "reliability.json",
                                                   Path("plots/eval") / n / "risk_coverage.json")]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise StageError(f"missing inputs: {', '.join(missing)} "
                         "(run `dvc repro`, or `up sample` / `up evaluate` for them)")

    # Before any output is written: the grids' sizes are checked as the figure is drawn.
    samples = grids_figure({n: Path("samples") / n / "grid.png" for n in first.values()})

    runs = {v: {s: _read_json(Path(f"metrics/eval-{v}-s{s}.json")) for s in params.seeds}
            for v in params.runs}
    keys = [k for k, _ in MAIN_COLUMNS] + SELECTIVE_KEYS + ["kid_std", "is_std"]
    summary = aggregate(runs, keys)
    fractions = {r.get("selective_fraction") for by_seed in runs.values() for r in by_seed.values()}
    fraction = fractions.pop() if len(fractions) == 1 else None
    baselines = [params.teacher] + [n for n, v in params.derived.items() if v.loss == "ts"]
    paired = {b: paired_differences(runs, b, [k for k, _ in PAIRED_KEYS])
              for b in baselines if b in runs} if len(params.seeds) > 1 else {}
    save_text(markdown(summary, fraction, paired), OUT / "summary.md")
    save_json({"variants": summary, "paired": paired}, OUT / "summary.json")
    save_json(headline(summary), OUT / "metrics.json")

    save_figure(samples, OUT / "samples.png")
    plots = {n: Path("plots/eval") / n for n in first.values()}
    save_figure(reliability_figure({n: _read_json(p / "reliability.json") for n, p in plots.items()}),
                OUT / "reliability.png")
    # results/selective.png: within-class risk-coverage curves of the failure rate
    save_figure(risk_coverage_figure({n: _read_json(p / "risk_coverage.json")
                                      for n, p in plots.items()}), OUT / "selective.png")
    print((OUT / "summary.md").read_text())
