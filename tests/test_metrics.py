"""The metric declarations: each declared key is computed by the module that declares it,
no key is declared twice, and the report's and the frontier's columns follow the
declarations (a metric declared here shows up without touching the report)."""

import json
import subprocess
import sys

import pytest
import torch

from tests.imports import ROOT
from tests.test_report import eval_metrics, make_project
from up.core.params import load_params
from up.evaluation import calibration, fidelity, frontier, report, selective
from up.evaluation.metrics import Metric, Table, register, summary_keys, tables
from up.generation.scores import ALL_MEASURES, IMAGE_SCORES


def _keys(metrics, flag: str | None = None) -> set[str]:
    return {m.key for m in metrics if flag is None or getattr(m, flag)}


def test_keys_are_declared_once():
    keys = [m.key for m in report.METRICS]
    assert len(keys) == len(set(keys))
    assert _keys(fidelity.METRICS) | _keys(selective.METRICS) | _keys(calibration.METRICS) == set(keys)
    with pytest.raises(ValueError, match="'fid' is declared twice"):
        register(fidelity.METRICS, [Metric("fid", "FID again")])


def test_declarations_that_cannot_be_shown_are_refused():
    with pytest.raises(ValueError, match="main column"):
        Metric("toy", "toy", headline=True)
    with pytest.raises(ValueError, match="in a table"):
        Metric("toy", "toy", main=True, interval=True)
    with pytest.raises(ValueError, match="better"):
        Metric("toy", "toy", "up")
    with pytest.raises(ValueError, match="without a column"):
        Metric("toy", "toy", main=True, summary=True)
    assert Metric("toy", "toy", "lower").heading == "toy ↓" and Metric("t", "t").heading == "t"


# -- each module computes what it declares ------------------------------------------------

def test_fidelity_computes_its_declared_keys():
    g = torch.Generator().manual_seed(0)
    gen = {"fid": torch.randn(40, 8, generator=g), "isc": torch.randn(40, 5, generator=g)}
    real = {"fid": torch.randn(30, 8, generator=g)}
    config = fidelity.FidelityConfig(extractor=fidelity.INCEPTION_EXTRACTOR, kid_subset_size=10,
                                     kid_subsets=3)
    assert _keys(fidelity.METRICS) <= set(fidelity.quality_from_features(gen, real, config))


def _selective_inputs(n_per_class: int = 12):
    g = torch.Generator().manual_seed(1)
    classes = torch.arange(3).repeat_interleave(n_per_class)
    scores = {s: torch.rand(len(classes), generator=g, dtype=torch.float64) for s in IMAGE_SCORES}
    failed = torch.rand(len(classes), generator=g) < 0.3
    log_p = -torch.rand(len(classes), generator=g, dtype=torch.float64)
    return classes, scores, failed, log_p


def test_selective_computes_its_declared_keys():
    classes, scores, failed, log_p = _selective_inputs()
    stats, _ = selective.selective_statistics(scores, classes, failed, {"failure": failed.double()},
                                              {"log_p": log_p}, repeats=20, seed=0)
    whole = {s: scores[s] for s in ALL_MEASURES}
    rows = selective.stratified_curves({**whole, "oracle": -log_p}, classes, [0.5, 1.0],
                                       lambda kept: {"fid": float(len(kept))}, 2, 0)
    g = torch.Generator().manual_seed(2)
    gen = {"features": torch.randn(36, 4, generator=g), "logits": torch.randn(36, 3, generator=g),
           "fid": torch.randn(36, 4, generator=g)}
    real = {"features": torch.randn(30, 4, generator=g), "logits": torch.randn(30, 3, generator=g),
            "fid": torch.randn(30, 4, generator=g)}
    computed = {**selective.set_figures(gen, real, classes, classes, classes[:30], 3),
                **selective.selective_figures(rows, stats, 0.5),
                **selective.failure_labels(gen["features"], gen["logits"].argmax(1), classes,
                                           real["features"], classes[:30], 1, 1.0, 0)[2]}
    assert set(summary_keys(selective.METRICS)) <= set(computed)


def test_calibration_computes_its_declared_keys():
    meter = calibration.CalibrationMeter(4)
    g = torch.Generator().manual_seed(0)
    meter.update(torch.randn(20, 6, generator=g), torch.randint(0, 6, (20,), generator=g))
    assert set(meter.figures()) == _keys(calibration.METRICS)


def test_the_sweep_row_has_every_curve_figure():
    from stages.sweep import guidance_row
    from up.core.distributed import Dist

    labels = torch.arange(2).repeat_interleave(10)
    g = torch.Generator().manual_seed(0)
    outputs = {"features": torch.randn(20, 4, generator=g), "fid": torch.randn(20, 4, generator=g),
               "logits": torch.nn.functional.one_hot(labels, 2).float()}

    def net(ids):
        return {key: value[ids] for key, value in outputs.items()}

    quality = fidelity.SubsetQuality(torch.randn(16, 4, generator=g), fidelity.FidelityConfig())
    row = guidance_row(lambda b, ids: (ids,), net, labels, 8, quality, Dist(), "toy sweep")
    assert set(frontier.curve_keys()) <= set(row)


# -- the report and the frontier follow the declarations --------------------------------

TOY = Metric("toy", "toy", "higher", main=True, paired=True, headline=True, curve=True)
TOY_TABLE = Table("Toy table ↑ at {fraction:.0%}", "A table declared by a test.")
TOY_COLUMN = Metric("toy_entropy", "entropy", "higher", table=TOY_TABLE, interval=True)


def test_a_declared_metric_appears_in_the_report(tmp_path, monkeypatch):
    from stages.report import run

    monkeypatch.setattr(report, "METRICS", register(report.METRICS, [TOY, TOY_COLUMN]))
    make_project(tmp_path, ["ce", "up"], [0, 1])
    for variant, i in (("ce", 0), ("up", 1)):
        for seed in (0, 1):
            metrics = {**eval_metrics(i, seed), "toy": 1.0 + i + seed / 2, "toy_entropy": 0.5,
                       "toy_entropy_lo": 0.25, "toy_entropy_hi": 0.75}
            (tmp_path / f"metrics/eval-{variant}-s{seed}.json").write_text(json.dumps(metrics))
    monkeypatch.chdir(tmp_path)
    run(load_params())
    text = (tmp_path / "results/summary.md").read_text()
    main_head = next(line for line in text.splitlines() if line.startswith("| variant | seeds |"))
    assert main_head.endswith("| token acc | toy ↑ |"), main_head
    assert "| up | 0,1 | 100 / 50 |" in text and "### Toy table ↑ at 50%" in text
    assert "### Paired with `ce`" in text and "ECE ↓ | NLL ↓ | toy ↑ |" in text
    headline = json.loads((tmp_path / "results/metrics.json").read_text())
    assert headline["up"]["toy"] == pytest.approx(2.25)
    summary = json.loads((tmp_path / "results/summary.json").read_text())
    assert summary["variants"]["ce"]["metrics"]["toy_entropy_lo"]["mean"] == 0.25
    assert summary["paired"]["ce"]["up"]["toy"]["mean"] == pytest.approx(1.0)


def test_a_declared_curve_is_averaged_on_the_frontier(monkeypatch):
    monkeypatch.setattr(report, "METRICS", register(report.METRICS, [TOY]))
    rows = [{"guidance": g, "fid": 5 - g, "precision": 0.2 * g, "recall": 1 - 0.2 * g,
             "class_accuracy": 0.3 * g, "diversity": 1 - 0.1 * g, "n_samples": 10}
            for g in (1.0, 2.0)]
    sweeps = {"ce": {seed: {"feature_extractor": "evaluator",
                            "rows": [{**r, "toy": r["guidance"] + seed} for r in rows]}
                     for seed in (0, 1)}}
    curves = frontier.summarize(sweeps, ["ce"])["curves"]["ce"]
    assert frontier.curve_keys()[-1] == "toy"
    assert [r["toy"] for r in curves] == [1.5, 2.5] and curves[0]["toy_sd"] == pytest.approx(0.5 ** 0.5)


def test_selective_tables_follow_the_declaration_order():
    titles = [table.title for table, _ in tables(report.METRICS)]
    assert titles[0].startswith("Within-class AUROC") and titles[-1].startswith("Stratified")
    assert [m.title for m in tables(report.METRICS)[0][1]] == IMAGE_SCORES


def test_report_and_frontier_load_without_torch_fidelity():
    code = ("import sys, stages.report, stages.frontier; "
            "assert 'torch_fidelity' not in sys.modules, 'torch_fidelity was imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
