"""Metric declarations: how the report, `dvc exp show` and the frontier show each figure.

The module that computes a figure of metrics/eval-*.json (or of a sweep row) declares it
next to the computation, as torch-fidelity names its metrics in one registry: its key,
its column title, which direction is better, and where it appears (a column of the main
table, a paired difference with the baselines, a headline of results/metrics.json, a
column of a selective-generation table, a curve of the frontier). The report's column
lists derive from the declarations (``up.evaluation.report.METRICS`` gathers them in
column order), so adding a metric touches the module that computes it and its test. Keys
that nothing shows (counts, seeds, diagnostics) need no declaration.

Pure Python: the report and the frontier read the declarations without running the
feature networks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Better = Literal["higher", "lower"]
ARROWS = {"higher": " ↑", "lower": " ↓", None: ""}


@dataclass(frozen=True)
class Table:
    """One selective-generation table of the report: its heading (``{fraction}`` is
    replaced by the kept fraction of every class) and the paragraph that explains it."""

    title: str
    text: str


@dataclass(frozen=True)
class Metric:
    """One figure of the metric files and where the report shows it.

    ``title`` is the short column title, without the arrow that ``better`` adds (no
    arrow: no direction is better on its own, e.g. diversity away from matched quality);
    ``name`` the figure in words for prose and axes (default: the title). ``main``: a
    column of the main table; ``paired``: a column of the paired differences with the
    baselines; ``headline``: in results/metrics.json (`dvc exp show`); ``summary``: kept
    in results/summary.json without a column; ``table``: a column of that
    selective-generation table, whose rows also carry ``{key}_lo`` / ``{key}_hi``
    bootstrap bounds when ``interval``; ``curve``: measured per guidance value by the
    sweep and averaged into the frontier's mean curves.
    """

    key: str
    title: str
    better: Better | None = None
    main: bool = False
    paired: bool = False
    headline: bool = False
    summary: bool = False
    table: Table | None = None
    interval: bool = False
    curve: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        if self.better not in ARROWS:
            raise ValueError(f"metric {self.key}: better must be 'higher', 'lower' or None")
        if (self.paired or self.headline) and not self.main:
            raise ValueError(f"metric {self.key}: a paired or headline figure is a main column")
        if self.interval and self.table is None:
            raise ValueError(f"metric {self.key}: bootstrap intervals are shown in a table")
        if self.summary and (self.main or self.table is not None):
            raise ValueError(f"metric {self.key}: 'summary' is for a figure without a column")

    @property
    def heading(self) -> str:
        """The column title with its arrow: ``FID ↓``."""
        return self.title + ARROWS[self.better]

    @property
    def words(self) -> str:
        return self.name or self.title


def register(*groups: Iterable[Metric]) -> tuple[Metric, ...]:
    """The declaring modules' metrics in column order, as one tuple. A key declared
    twice raises: two modules would write one field of the metric file."""
    metrics = tuple(m for group in groups for m in group)
    seen: set[str] = set()
    for m in metrics:
        if m.key in seen:
            raise ValueError(f"metric {m.key!r} is declared twice")
        seen.add(m.key)
    return metrics


def main_columns(metrics: Sequence[Metric]) -> list[tuple[str, str]]:
    """(key, heading) of the main table's columns."""
    return [(m.key, m.heading) for m in metrics if m.main]


def paired_columns(metrics: Sequence[Metric]) -> list[tuple[str, str]]:
    """(key, heading) of the paired-difference tables' columns."""
    return [(m.key, m.heading) for m in metrics if m.paired]


def headline_keys(metrics: Sequence[Metric]) -> list[str]:
    """The figures `dvc exp show` lists per experiment (results/metrics.json)."""
    return [m.key for m in metrics if m.headline]


def tables(metrics: Sequence[Metric]) -> list[tuple[Table, list[Metric]]]:
    """The selective-generation tables in the order of their first column, each with
    its columns in declaration order."""
    out: dict[Table, list[Metric]] = {}
    for m in metrics:
        if m.table is not None:
            out.setdefault(m.table, []).append(m)
    return list(out.items())


def summary_keys(metrics: Sequence[Metric]) -> list[str]:
    """Every key results/summary.json aggregates, in its order: the main columns, the
    tables' columns, their bootstrap bounds, then the figures kept without a column."""
    in_tables = [m for _, columns in tables(metrics) for m in columns]
    return ([m.key for m in metrics if m.main] + [m.key for m in in_tables]
            + [f"{m.key}_{end}" for m in in_tables if m.interval for end in ("lo", "hi")]
            + [m.key for m in metrics if m.summary])


def curve_keys(metrics: Sequence[Metric], first: Sequence[str] = ()) -> list[str]:
    """The frontier's curve figures: ``first`` (those it plots, in its order), then
    every other metric declared ``curve``; each must be declared ``curve``."""
    declared = [m.key for m in metrics if m.curve]
    missing = [k for k in first if k not in declared]
    if missing:
        raise ValueError(f"the frontier plots {missing}, which no metric declares as a curve")
    return list(first) + [k for k in declared if k not in first]
