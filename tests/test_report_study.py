"""The report and the frontier of a study folder (results/<study>/runs/*/): which runs
are read and which are missing, the Holm family, the dose table, the weight selected
by the calibration NLL, and the README blocks that are the report's own markdown."""

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from tests.test_report import eval_metrics, make_project
from up.core.io import save_json
from up.core.params import load_params
from up.evaluation.report import (
    adjust_family,
    holm,
    paired_keys,
    rewrite_readme,
    t_test_p,
)
from up.generation.scores import IMAGE_SCORES as RANKED

README = Path(__file__).resolve().parents[1] / "README.md"

# -- the statistics, by hand ------------------------------------------------------------


def test_holm_adjustment_by_hand():
    """Sorted 0.01, 0.03, 0.04, 0.20 times 4, 3, 2, 1: 0.04, 0.09, 0.08 -> 0.09 (never below
    the one before it), 0.20; returned in the input's order."""
    assert holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])  # 0.4 * 2, then max(0.8, 0.5)
    assert holm([0.9, 0.8, 0.7]) == pytest.approx([1.0, 1.0, 1.0])  # capped at 1
    assert holm([]) == []


def test_paired_t_test_p_value_by_hand():
    """Differences 0.5, 0.1, 0.7: t = 0.4333 / (0.30551 / sqrt 3) = 2.4567 with 2 degrees of
    freedom, whose two-sided p is 1 - t / sqrt(2 + t^2) in closed form."""
    t = 0.433333 / (0.305505 / math.sqrt(3))
    assert t_test_p([0.5, 0.1, 0.7]) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-5)
    assert t_test_p([0.3]) is None
    # no spread, no test (outside the Holm family): equal in every seed (ce+ts's FID is
    # ce's), or the same difference in every seed (t infinite, p 0: an artefact)
    assert t_test_p([0.0, 0.0]) is None and t_test_p([-0.003, -0.003]) is None


def test_figures_shared_by_construction_are_not_in_the_family():
    """`ce+ts` samples `ce`'s images: its FID equals `ce`'s in every seed, so that cell is
    printed as equal and is no comparison; its precision differs by the same amount in
    both seeds (no spread: no test either); its ECE differs, and is one: a family of 1."""
    from up.evaluation.report import paired_differences, paired_markdown

    ce = {s: {key: 0.5 + 0.1 * s for key in paired_keys()} for s in (0, 1)}
    runs = {"ce": ce, "ce+ts": {s: {**m, "ece": m["ece"] / 40 + 0.001 * s,
                                    "precision": m["precision"] - 0.003} for s, m in ce.items()}}
    paired = {"ce": paired_differences(runs, "ce", paired_keys())}
    assert paired["ce"]["ce+ts"]["fid"]["p"] is None and paired["ce"]["ce+ts"]["ece"]["p"] > 0
    assert adjust_family(paired, ["ce", "ce+ts"]) == 1
    assert paired["ce"]["ce+ts"]["fid"]["p_holm"] is None
    table = "\n".join(paired_markdown(paired, p_values=True))
    row = next(line for line in table.splitlines() if line.startswith("| ce+ts | 0,1 |"))
    assert "= (equal)" in row and "-0.003 (every seed)" in row  # neither is tested
    assert paired["ce"]["ce+ts"]["precision"]["p"] is None


def test_family_counts_a_pair_compared_both_ways_once():
    """ce+ts - ce and ce - ce+ts are one comparison; up - ce and up - ce+ts two more;
    `dose` is outside the family: m = 3, so 0.01 -> 0.03, 0.02 -> 0.04, 0.04 -> 0.04."""
    cell = lambda p: {"mean": 1.0, "p": p}  # noqa: E731
    paired = {"ce": {"ce+ts": {"fid": cell(0.02)}, "up": {"fid": cell(0.01)},
                     "dose": {"fid": cell(0.001)}},
              "ce+ts": {"ce": {"fid": cell(0.02)}, "up": {"fid": cell(0.04)}}}
    assert adjust_family(paired, ["ce", "ce+ts", "up"]) == 3
    assert paired["ce"]["up"]["fid"]["p_holm"] == pytest.approx(0.03)
    assert paired["ce"]["ce+ts"]["fid"]["p_holm"] == paired["ce+ts"]["ce"]["fid"]["p_holm"] \
        == pytest.approx(0.04)
    assert paired["ce+ts"]["up"]["fid"]["p_holm"] == pytest.approx(0.04)
    assert paired["ce"]["dose"]["fid"]["p_holm"] is None


# -- a fake study -------------------------------------------------------------------------

UP = {"loss": "up", "kappa": 1.0, "penalty": "w2", "reference": "teacher", "smoothing": 0.1,
      "semantic": "match", "calib_every": 50, "fused": True}
# name: (settings, {seed: calib NLL}, eval NLL offset)
RUNS = {
    "ce": ({"loss": "ce"}, {0: 3.2, 1: 3.2}),
    "ce+ts": ({"loss": "ts"}, {0: 3.2, 1: 3.2}),
    "kd_l1": ({"loss": "kd", "lambda_kd": 1.0}, {0: 3.0, 1: 3.0}),
    "kd_l4": ({"loss": "kd", "lambda_kd": 4.0}, {0: 2.9, 1: 2.9}),
    # the dose-response of up_teacher: 0.5 and 32 with seeds 0, 1; 8 is the run that was
    # once the default, with a third seed. Over the seeds every weight ran (0, 1): 0.5 ->
    # 3.0, 8 -> 2.8, 32 -> 2.75: 32 is selected; over all seeds 8 would be (2.2).
    "up_teacher_l0.5": ({**UP, "lambda_disp": 0.5, "lambda_se": 0.1}, {0: 2.9, 1: 3.1}),
    "up_teacher": ({**UP, "lambda_disp": 8.0, "lambda_se": 0.1}, {0: 2.8, 1: 2.8, 2: 1.0}),
    "up_teacher_l32": ({**UP, "lambda_disp": 32.0, "lambda_se": 0.1}, {0: 2.6, 1: 2.9}),
    # the ablations at 32: dispersion only, semantic only
    "up_teacher_se0": ({**UP, "lambda_disp": 32.0, "lambda_se": 0.0}, {0: 3.0, 1: 3.0}),
    "up_teacher_disp0": ({**UP, "lambda_disp": 0.0, "lambda_se": 0.1}, {0: 3.0, 1: 3.0}),
}
# the study's profile declares seeds 0, 1 and a post-hoc run that never ran
PROFILE = {"seeds": [0, 1], "teacher": "ce",
           "variants": {n: s for n, (s, _) in RUNS.items() if s["loss"] not in ("ts", "kd")
                        and s.get("reference") != "teacher"},
           "derived": {n: s for n, (s, _) in RUNS.items() if n not in ("ce",)},
           "post_hoc": ["up_teacher_l32"]}
DOSE = {0: {"ce": 2.0, "disp": 0.5, "se": 0.1}, 1: {"ce": 2.0, "disp": 1.0, "se": 0.1}}


def sweep_rows(index: int, seed: int, temperature: bool = False) -> list[dict]:
    """Class accuracy 0.8 -> 1.0 over guidance 1 -> 3 for every run, diversity 1 -> 0.5
    shifted by 0.01 per run (and seed): at class accuracy 0.9, 0.75 + the shift."""
    shift = 0.01 * index + 0.001 * seed
    rows = [{"axis": "guidance", "guidance": g, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
             "fid": 1.0 + shift, "precision": p, "recall": 0.9 - p + shift, "class_accuracy": a,
             "diversity": d + shift, "n_samples": 100}
            for g, p, a, d in [(1.0, 0.5, 0.8, 1.0), (3.0, 0.9, 1.0, 0.5)]]
    if temperature:
        rows += [{"axis": "temperature", "guidance": 2.0, "temperature": t, "top_k": 0, "top_p": 1.0,
                  "fid": 1.0, "precision": p, "recall": 1.0 - p, "class_accuracy": a,
                  "diversity": 1.5 - a, "n_samples": 100}
                 for t, p, a in [(1.25, 0.6, 0.85), (0.8, 0.8, 0.95)]]
    return rows


def write_study(root: Path, name: str = "toy") -> Path:
    folder = root / "results" / name
    folder.mkdir(parents=True)
    (folder / "profiles").mkdir()
    (folder / "profiles/dose.yaml").write_text(yaml.safe_dump(PROFILE, sort_keys=False))
    for i, (variant, (settings, calib)) in enumerate(RUNS.items()):
        for seed, nll in calib.items():
            run = folder / "runs" / f"{variant}-s{seed}"
            metrics = eval_metrics(0, seed)
            metrics.update(ece=0.2 - 0.001 * i - 0.0003 * seed * i, nll=3.0 + 0.01 * i + 0.0005 * seed * i,
                           fid=0.5 + 0.02 * i + 0.001 * seed * seed * i)
            save_json(metrics, run / "eval.json")
            train = {"calib": {"nll": nll, "tokens": 1000},
                     "compute": {"student_gflop": 100.0, "teacher_gflop": 0.0, "total_gflop": 100.0}}
            if variant == "up_teacher_l32":
                train.update(dose=DOSE[seed], compute={"student_gflop": 100.0, "teacher_gflop": 50.0,
                                                       "total_gflop": 150.0})
            save_json(train, run / "train.json")
            save_json({"variant": variant, "seed": seed, "feature_extractor": "evaluator",
                       "rows": sweep_rows(i, seed, temperature=variant == "ce")}, run / "sweep.json")
            save_json({"variant": variant, "seed": seed, "loss": settings}, run / "params.json")
            save_json([{"bin": b, "confidence": (b + 0.5) / 4, "accuracy": b / 4, "count": 10}
                       for b in range(4)], run / "eval" / "reliability.json")
            save_json([{"score": s, "risk": "failure", "coverage": c, "value": 0.1 * c}
                       for s in (RANKED[0], "random") for c in (0.5, 1.0)],
                      run / "eval" / "risk_coverage.json")
    return folder


@pytest.fixture
def study(tmp_path, monkeypatch):
    make_project(tmp_path, ["ce"], [0])  # a valid params.yaml to run the stage with
    folder = write_study(tmp_path)
    monkeypatch.chdir(tmp_path)
    from stages.report import run

    run(load_params(), study="toy")
    return folder


def test_study_report_lists_the_runs_and_names_the_missing(study):
    text = (study / "summary.md").read_text()
    assert "Runs read from results/toy/runs/: 19 of the 20 the study's profiles declare." in text
    assert "- `up_teacher`: seeds 0, 1, 2" in text
    assert "- missing: `up_teacher_l32+ts-s0`, `up_teacher_l32+ts-s1`" in text
    summary = json.loads((study / "summary.json").read_text())
    assert list(summary["variants"]) == list(RUNS)  # the profile's order
    for name in ("metrics.json", "reliability.png", "selective.png", "dose_response.png"):
        assert (study / name).stat().st_size > 0
    assert not (study.parent / "summary.md").exists()  # the pipeline's report is untouched


def test_selected_weight_is_the_lowest_calibration_nll_over_common_seeds(study):
    selection = json.loads((study / "selection.json").read_text())
    assert list(selection) == ["kd", "up · teacher · lambda_se 0.1"]  # the runs' order
    up = selection["up · teacher · lambda_se 0.1"]
    assert up["weights"] == [0.5, 8.0, 32.0] and up["seeds"] == [0, 1]
    assert up["calib_nll"]["8"]["values"] == [2.8, 2.8]  # seed 2 is not every weight's
    assert up["calib_nll"]["32"]["mean"] == pytest.approx(2.75)
    assert up["selected"] == 32.0 and up["selected_run"] == "up_teacher_l32"
    assert selection["kd"]["selected"] == 4.0 and selection["kd"]["selected_run"] == "kd_l4"
    text = (study / "summary.md").read_text()
    assert "| **32** (selected) | 0,1 | 2.75 |" in text
    # diversity at class accuracy 0.9 (every run reaches 0.8-1.0): 0.75 + 0.01 i + 0.001 s
    response = json.loads((study / "summary.json").read_text())["dose_response"]
    point = response["up · teacher · lambda_se 0.1"]["points"]["32"]
    assert response["up · teacher · lambda_se 0.1"]["level"] == pytest.approx(0.9)
    assert point["diversity"]["mean"] == pytest.approx(0.75 + 0.06 + 0.0005)
    assert list(response["kd"]["references"]) == ["ce", "ce+ts"]
    assert list(response["up · teacher · lambda_se 0.1"]["references"]) == ["ce", "ce+ts", "kd_l4"]


def test_holm_family_is_the_confirmatory_runs_paired_with_the_baselines(study):
    summary = json.loads((study / "summary.json").read_text())
    assert summary["confirmatory"] == ["ce", "ce+ts", "kd_l4", "up_teacher_l32"]
    assert list(summary["paired"]) == ["ce", "ce+ts", "kd_l4"]
    # pairs among 4 confirmatory runs, 3 of them baselines: all 6, each once, over the
    # figures the toy runs differ in (FID, ECE, NLL); the others are equal in every seed
    m = 6 * 3
    text = (study / "summary.md").read_text()
    assert f"Confirmatory comparisons: {m} " in text and f"Holm-adjusted over these {m}" in text
    cells = [c for by_v in summary["paired"].values() for v, cs in by_v.items()
             if v in summary["confirmatory"] for c in cs.values() if c is not None and c["p"] is not None]
    assert all(c["p_holm"] >= c["p"] for c in cells)
    confirmed = text.split("## Confirmatory set")[1].split("\n## ")[0]
    rows = [line.split(" | ")[0].lstrip("| ") for line in confirmed.splitlines()
            if line.startswith("| ") and not line.startswith("| variant")]
    assert rows == summary["confirmatory"]
    explored = text.split("## Exploratory paired differences")[1].split("\n## ")[0]
    assert "| up_teacher_se0 |" in explored and "| up_teacher_l32 |" not in explored


def test_ablations_sit_beside_the_selected_run(study):
    """up_teacher_l32 (selected; run index 6) with its dispersion-only (se0, index 7) and
    semantic-only (disp0, index 8) runs: calibration NLL 2.75 / 3.0 / 3.0; ECE 0.2 -
    0.00115 i over seeds 0, 1; diversity at class accuracy 0.9: 0.75 + 0.01 i + 0.0005."""
    ablated = json.loads((study / "summary.json").read_text())["ablations"]
    assert list(ablated) == ["up · teacher · lambda_se 0.1"]  # kd has no ablations
    rows = ablated["up · teacher · lambda_se 0.1"]["rows"]
    assert ablated["up · teacher · lambda_se 0.1"]["seeds"] == [0, 1]
    assert {r: e["variant"] for r, e in rows.items()} == {
        "full": "up_teacher_l32", "dispersion only": "up_teacher_se0",
        "semantic only": "up_teacher_disp0"}
    assert rows["full"]["calib_nll"]["mean"] == pytest.approx(2.75)
    assert rows["dispersion only"]["ece"]["mean"] == pytest.approx(0.2 - 0.00115 * 7)
    assert rows["semantic only"]["diversity"]["mean"] == pytest.approx(0.75 + 0.08 + 0.0005)
    table = (study / "summary.md").read_text().split("## Ablations at the selected weight")[1]
    assert "| dispersion only | `up_teacher_se0` | 0,1 | 3 |" in table


def test_ablation_rows_compare_over_the_seeds_every_row_ran():
    """The selected run has five seeds, its ablations two: the full row is read over
    seeds 0 and 1 (ECE (0.1 + 0.2) / 2), not over all five (0.3)."""
    from up.evaluation import dose

    def run(settings, ece):
        return {"settings": settings, "eval": {"ece": ece, "nll": 3.0, "fid": 1.0},
                "train": {"calib": {"nll": 3.0}}, "sweep": None}

    full = {**UP, "lambda_disp": 32.0, "lambda_se": 0.1}
    runs = {"full": {s: run(full, 0.1 * (s + 1)) for s in range(5)},
            "se0": {s: run({**full, "lambda_se": 0.0}, 0.5) for s in (0, 1)}}
    selection = {"up": {"loss": "up", "selected_run": "full", "variants": {"32": ["full"]}}}
    rows = dose.ablation_response(runs, selection)["up"]["rows"]
    assert rows["full"]["ece"]["mean"] == pytest.approx(0.15)
    assert sorted(rows["full"]["ece"]["values"]) == [0, 1]


def test_dose_table_ratios_and_compute_by_hand(study):
    """up_teacher_l32: disp / CE 0.25 and 0.5 over the seeds -> 0.375, se / CE 0.05;
    150 GFLOP against ce's 100 -> 1.5; runs without a dose record show n/a."""
    dose = json.loads((study / "summary.json").read_text())["dose"]
    assert dose["up_teacher_l32"]["disp_to_ce"] == pytest.approx(0.375)
    assert dose["up_teacher_l32"]["se_to_ce"] == pytest.approx(0.05)
    assert dose["up_teacher_l32"]["kd_to_ce"] is None
    assert dose["up_teacher_l32"]["gflop_to_teacher"] == pytest.approx(1.5)
    text = (study / "summary.md").read_text()
    assert "| up_teacher_l32 | 0,1 | 2 | 0.375 | 0.05 | n/a | 150 | 1.5 |" in text
    assert "| ce | 0,1 | n/a | n/a | n/a | n/a | 100 | 1 |" in text


def test_study_frontier_has_the_temperature_curve_and_missing_runs(study):
    from stages.frontier import run

    run(load_params(), study="toy")
    summary = json.loads((study / "frontier.json").read_text())
    assert "ce (temperature)" in summary["variants"] and "ce (temperature)" in summary["paired"]
    assert list(summary["paired"])[:2] == ["ce", "ce+ts"]
    text = (study / "frontier.md").read_text()
    assert "missing: `up_teacher_l32+ts-s0`" in text
    # the exploratory runs (other dose points, ablations) are left out, and said so
    assert set(summary["variants"]) >= {"ce", "ce+ts", "kd_l4", "up_teacher_l32"}
    assert not {"kd_l1", "up_teacher", "up_teacher_se0", "up_teacher_disp0"} & set(summary["variants"])
    assert "Left out here, as exploratory:" in text and "`up_teacher_se0`" in text
    assert "kd_l1" not in summary["paired"]
    assert (study / "frontier.png").stat().st_size > 0


# -- README blocks are the report's own markdown -----------------------------------------

def test_readme_blocks_are_rewritten_from_the_report(study, tmp_path):
    from stages.report import run

    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\nIntro.\n\n<!-- study:toy:summary#Dose of each term and "
                      "training compute -->\nhand-copied, stale\n<!-- /study -->\n\nBetween.\n\n"
                      "<!-- study:toy:summary -->\n<!-- /study -->\nEnd.\n")
    run(load_params(), study="toy", readme=readme)
    text = readme.read_text()
    summary = (study / "summary.md").read_text()
    assert "stale" not in text and text.startswith("# Project\n\nIntro.\n\n") and text.endswith("End.\n")
    dose = summary.split("## Dose of each term")[1].split("\n## ")[0]
    block = text.split("training compute -->\n")[1].split("<!-- /study -->")[0]
    assert block == "\n#### Dose of each term" + dose.rstrip("\n") + "\n\n"  # two levels down
    whole = text.split("<!-- study:toy:summary -->\n")[1].split("<!-- /study -->")[0]
    body = summary.split("\n", 1)[1]  # all but the title line
    assert "\n#### Dose-response\n" in whole and "\n## " not in whole
    assert whole.strip("\n") == re.sub(r"^(#+) ", r"##\1 ", body, flags=re.M).strip("\n")
    assert rewrite_readme(text) == text  # generated: rewriting again changes nothing


def test_readme_study_tables_equal_the_reports():
    """Every study block of the project's README holds its report's markdown verbatim
    (`up report --study NAME --readme README.md` writes them)."""
    text = README.read_text()
    blocks = re.findall(r"<!-- study:([^:\s]+):", text)
    if not blocks:
        pytest.skip("the README has no study blocks")
    assert rewrite_readme(text, README.parent / "results") == text, \
        "README study tables differ from results/<study>/*.md: `up report --study NAME --readme README.md`"
