"""End to end: the real `dvc repro` and `dvc exp run` on a tiny configuration."""

import json

import pytest

from tests.project import TINY, copy_project, run


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("e2e") / "p",
                           {**TINY, "variants": {"ce": {"loss": "ce"},
                                                 "up": {"loss": "up", "calib_every": 2}}})
    run(["dvc", "repro"], project)
    return project


def test_repro_writes_every_stage_output(repro):
    for rel in ["data/prepared/train.pt", "models/tokenizer.pt", "data/tokens/train.pt",
                "models/evaluator.pt", "models/var-ce-s0.pt", "models/var-up-s0.pt",
                "samples/ce-s0/samples.pt", "samples/up-s0/grid.png",
                "results/summary.md", "results/summary.json"]:
        assert (repro / rel).is_file(), rel
    for variant in ("ce", "up"):
        metrics = json.loads((repro / f"metrics/eval-{variant}-s0.json").read_text())
        for key in ("fid", "kid_mean", "is_mean", "precision", "recall", "ece", "diversity"):
            assert isinstance(metrics[key], float), key
    summary = json.loads((repro / "results/summary.json").read_text())
    assert summary  # one entry per variant
    status = run(["dvc", "status"], repro).stdout
    assert "up to date" in status or status.strip() == "", status


def test_metrics_show_lists_every_stage(repro):
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repro).stdout)
    files = next(iter(shown.values()))["data"]
    assert {"metrics/prepare.json", "metrics/tokenizer.json", "metrics/eval-up-s0.json"} <= set(files)
    prepare = files["metrics/prepare.json"]["data"]
    assert prepare["splits"]["train"]["total"] + prepare["splits"]["val"]["total"] \
        + prepare["splits"]["test"]["total"] == 1797


def test_exp_run_with_override_is_listed(repro):
    run(["git", "add", "-A"], repro)
    run(["git", "commit", "-qm", "baseline run"], repro)
    run(["dvc", "exp", "run", "-n", "lowdisp", "-S", "variants.up.lambda_disp=0.05"], repro)
    rows = json.loads(run(["dvc", "exp", "show", "--json"], repro).stdout)
    text = json.dumps(rows)
    assert "lowdisp" in text and "eval-up-s0.json" in text


def test_prepare_then_exp_run_switches_source(tmp_path):
    project = copy_project(tmp_path / "p")
    run(["dvc", "repro", "prepare"], project)
    first = json.loads((project / "metrics/prepare.json").read_text())
    assert first["source"] == "mnist5k" and first["images"] == 5000
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "prepared"], project)
    run(["dvc", "exp", "run", "-n", "digits", "-S", "data.source=digits", "prepare"], project)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    assert '"images": 1797' in json.dumps(shown).replace("1797.0", "1797")
