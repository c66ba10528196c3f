"""report: the table's numbers are the per-run metric files' numbers (mean, sample std)."""

import json
import statistics

import pytest
import torch
import yaml

from tests.project import params_dict
from up.core.errors import StageError
from up.core.io import save_image_grid, save_json
from up.core.params import load_params
from up.evaluation.metrics import headline_keys, main_columns, tables
from up.evaluation.report import METRICS, paired_differences, paired_keys
from up.generation.scores import IMAGE_SCORES as RANKED

MAIN_COLUMNS = main_columns(METRICS)
HEADLINE_KEYS = headline_keys(METRICS)
SELECTIVE = [m for _, columns in tables(METRICS) for m in columns]
SELECTIVE_COLUMNS = [m.key for m in SELECTIVE]
# the selective tables' columns, then their bootstrap bounds
SELECTIVE_KEYS = SELECTIVE_COLUMNS + [f"{m.key}_{end}" for m in SELECTIVE if m.interval
                                      for end in ("lo", "hi")]

SCORES = ["entropy", "dispersion", "semantic_entropy", "random"]


def eval_metrics(variant_index: int, seed: int) -> dict:
    """Distinct, hand-traceable numbers per (variant, seed)."""
    base = 10.0 * (variant_index + 1) + 1.5 * seed
    metrics = {key: base + i / 8 for i, (key, _) in enumerate(MAIN_COLUMNS)}
    metrics["class_accuracy"] = None if variant_index == 1 else metrics["class_accuracy"]
    metrics.update({key: base - i for i, key in enumerate(SELECTIVE_KEYS)})
    metrics.update(kid_std=0.01, is_std=0.2, selective_fraction=0.5, n_samples=100, n_real=50,
                   seed=seed, sample_seed=seed, feature_extractor="evaluator")
    return metrics


def make_project(root, variants: list[str], seeds: list[int]) -> None:
    params = params_dict(data={"source": "digits"}, seeds=seeds,
                         variants={v: {"loss": v} for v in variants}, derived={})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for i, variant in enumerate(variants):
        for seed in seeds:
            name = f"{variant}-s{seed}"
            save_json(eval_metrics(i, seed), root / "metrics" / f"eval-{name}.json")
            save_json([{"bin": b, "confidence": (b + 0.5) / 4, "accuracy": b / 4, "count": 10}
                       for b in range(4)], root / "plots/eval" / name / "reliability.json")
            save_json([{"score": s, "fraction": f, "kept": int(100 * f), "repeats": 1,
                        "fid": 5.0 * f + i, "precision": 0.5, "recall": 0.5,
                        "class_accuracy": None} for s in SCORES for f in (1.0, 0.5)],
                      root / "plots/eval" / name / "selective.json")
            save_json([{"score": s, "risk": "failure", "coverage": c, "value": 0.1 * c + i}
                       for s in RANKED[:3] + ["random", "oracle"] for c in (0.5, 1.0)],
                      root / "plots/eval" / name / "risk_coverage.json")
            save_image_grid(torch.full((4, 1, 8, 8), 40 * i, dtype=torch.uint8),
                            root / "samples" / name / "grid.png", nrow=2)


def table_rows(markdown: str) -> dict[str, list[str]]:
    """First table's rows by variant name: the cells after variant, seeds, N."""
    table = markdown.split("## ")[0]
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[3:]] for cells in rows[1:]}


def test_table_equals_metric_files_mean_and_std_over_seeds(tmp_path, monkeypatch):
    from stages.report import run

    make_project(tmp_path, ["ce", "up"], [0, 1])
    monkeypatch.chdir(tmp_path)
    run(load_params())
    summary = json.loads((tmp_path / "results/summary.json").read_text())["variants"]
    rows = table_rows((tmp_path / "results/summary.md").read_text())
    assert list(rows) == ["ce", "up"]
    for variant in ("ce", "up"):
        files = [json.loads((tmp_path / f"metrics/eval-{variant}-s{s}.json").read_text())
                 for s in (0, 1)]
        assert summary[variant]["seeds"] == [0, 1] and summary[variant]["n_samples"] == [100]
        for (key, _), cell in zip(MAIN_COLUMNS, rows[variant], strict=True):
            values = [f[key] for f in files]
            entry = summary[variant]["metrics"][key]
            assert entry["values"] == values
            if None in values:
                assert cell == "n/a" and entry["mean"] is None
                continue
            mean, std = statistics.fmean(values), statistics.stdev(values)
            assert entry["mean"] == pytest.approx(mean) and entry["std"] == pytest.approx(std)
            assert cell == f"{mean:.4g} ± {std:.2g}"
    # ce: fid of seeds 0 and 1 is 10 and 11.5 -> 10.75 +- 1.06
    assert rows["ce"][0] == "10.75 ± 1.1"
    headline = json.loads((tmp_path / "results/metrics.json").read_text())
    assert list(headline) == ["ce", "up"] and list(headline["ce"]) == HEADLINE_KEYS
    assert headline["ce"]["fid"] == pytest.approx(10.75)
    assert headline["up"]["ece"] == pytest.approx(summary["up"]["metrics"]["ece"]["mean"])
    for name in ("samples.png", "reliability.png", "selective.png"):
        assert (tmp_path / "results" / name).stat().st_size > 0


def test_single_seed_cells_are_the_values(tmp_path, monkeypatch):
    from stages.report import run

    make_project(tmp_path, ["ce"], [3])
    monkeypatch.chdir(tmp_path)
    run(load_params())
    text = (tmp_path / "results/summary.md").read_text()
    metrics = eval_metrics(0, 3)
    assert table_rows(text)["ce"] == [f"{metrics[k]:.4g}" for k, _ in MAIN_COLUMNS]
    selective = text.split("## Selective generation")[1]
    assert "most certain 50% of every class" in selective
    # one seed: the value and its bootstrap interval; subset FID has none
    auroc = (f"| ce | 3 | 100 / 50 | {metrics['auroc_entropy']:.3g} "
             f"[{metrics['auroc_entropy_lo']:.3g}, {metrics['auroc_entropy_hi']:.3g}] |")
    assert auroc in selective
    assert f"| ce | 3 | 100 / 50 | {metrics['selective_fid_entropy']:.4g} |" in selective
    assert len([line for line in selective.splitlines() if line.startswith("| ce |")]) == len(tables(METRICS))


def test_selective_tables_show_mean_and_std_over_seeds(tmp_path, monkeypatch):
    from stages.report import run

    make_project(tmp_path, ["ce", "up"], [0, 1])
    monkeypatch.chdir(tmp_path)
    run(load_params())
    text = (tmp_path / "results/summary.md").read_text().split("## Selective generation")[1]
    values = [eval_metrics(1, s)["aurc_gain_surprisal_fine"] for s in (0, 1)]
    cell = f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}"
    row = next(line for line in text.split("### AURC gain")[1].splitlines()
               if line.startswith("| up |"))
    assert row.split(" | ")[3 + RANKED.index("surprisal_fine")] == cell
    assert set(SELECTIVE_COLUMNS) <= set(SELECTIVE_KEYS)


def test_missing_run_is_named(tmp_path, monkeypatch):
    from stages.report import run

    make_project(tmp_path, ["ce", "up"], [0])
    (tmp_path / "metrics/eval-up-s0.json").unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match="metrics/eval-up-s0.json"):
        run(load_params())
    assert not (tmp_path / "results").exists()


def test_paired_difference_interval_by_hand():
    runs = {"ce": {s: {"fid": v} for s, v in zip((0, 1, 2), (1.0, 2.0, 3.0), strict=True)},
            "up": {s: {"fid": v} for s, v in zip((0, 1, 2), (1.5, 2.1, 3.7), strict=True)}}
    cell = paired_differences(runs, "ce", ["fid"])["up"]["fid"]
    # diffs 0.5, 0.1, 0.7: mean 0.4333, sd 0.30551, t(0.975, 2) = 4.302653
    half = 4.302653 * 0.305505 / 3 ** 0.5
    assert cell["mean"] == pytest.approx(0.433333, abs=1e-6)
    assert cell["low"] == pytest.approx(0.433333 - half, abs=1e-5)
    assert cell["high"] == pytest.approx(0.433333 + half, abs=1e-5)
    assert cell["n"] == 3 and cell["seeds"] == [0, 1, 2]


def test_report_has_paired_tables_against_teacher_and_ts(tmp_path, monkeypatch):
    from stages.report import run

    make_project(tmp_path, ["ce", "up"], [0, 1])
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["derived"] = {"ce+ts": {"loss": "ts"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for seed in (0, 1):
        metrics = eval_metrics(0, seed)
        metrics["fid"] += 0.25 * (seed + 1)  # ce+ts - ce: +0.25, +0.5
        save_json(metrics, tmp_path / "metrics" / f"eval-ce+ts-s{seed}.json")
        # up - ce: 10 +- 0.1 (a spread to test; the same difference in both seeds is none)
        up = eval_metrics(1, seed)
        up.update({k: v + 0.1 * (1 - 2 * seed) for k, v in up.items()
                   if k in paired_keys() and v is not None})
        save_json(up, tmp_path / "metrics" / f"eval-up-s{seed}.json")
    for rel in ("plots/eval/ce-s0/reliability.json", "plots/eval/ce-s0/risk_coverage.json",
                "samples/ce-s0/grid.png"):
        target = tmp_path / rel.replace("ce-s0", "ce+ts-s0")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((tmp_path / rel).read_bytes())
    monkeypatch.chdir(tmp_path)
    run(load_params())
    paired = json.loads((tmp_path / "results/summary.json").read_text())["paired"]
    assert set(paired) == {"ce", "ce+ts"}
    assert paired["ce"]["ce+ts"]["fid"]["mean"] == pytest.approx(0.375)
    assert paired["ce"]["up"]["fid"]["mean"] == pytest.approx(10.0)
    assert paired["ce+ts"]["up"]["fid"]["mean"] == pytest.approx(10.0 - 0.375)
    text = (tmp_path / "results/summary.md").read_text()
    assert "### Paired with `ce`" in text and "### Paired with `ce+ts`" in text
    # Holm family: {ce, up} and {ce+ts, up} over every paired column but up's class
    # accuracy (null), and {ce, ce+ts} over FID alone (its other figures are ce's)
    m = 2 * (len(paired_keys()) - 1) + 1
    assert f"Confirmatory comparisons: {m} " in text and "p-values, paired with `ce+ts`" in text
    assert paired["ce"]["ce+ts"]["fid"]["p_holm"] == paired["ce+ts"]["ce"]["fid"]["p_holm"]
