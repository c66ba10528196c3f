"""The study driver's plan and its all-or-nothing run folders (the end-to-end run of
`up study` is in tests/test_pipeline.py)."""

import json

import pytest

from stages import study
from tests.project import params_from_yaml
from up.core import paths


def test_plan_is_seed_major_and_puts_each_run_after_the_model_it_needs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here to merge its variants into these
    params = params_from_yaml(
        seeds=[1, 0],
        variants={"ce": {"loss": "ce"}, "up_emp": {"loss": "up", "reference": "empirical"}},
        derived={"ce+ts": {"loss": "ts"}, "up_teacher": {"loss": "up", "reference": "teacher"}},
        post_hoc=["up_teacher"])
    runs = study.plan(params)
    assert [r.tag for r in runs] == [
        "ce-s1", "up_emp-s1", "ce+ts-s1", "up_teacher-s1", "up_teacher+ts-s1",
        "ce-s0", "up_emp-s0", "ce+ts-s0", "up_teacher-s0", "up_teacher+ts-s0"]
    assert [r.needs for r in runs[:5]] == [None, None, "ce-s1", "ce-s1", "up_teacher-s1"]
    assert [r.empirical for r in runs[:5]] == [False, True, False, False, False]
    # FIFO lanes cannot deadlock: every run a run waits for was submitted before it
    order = [r.tag for r in runs]
    assert all(order.index(r.needs) < order.index(r.tag) for r in runs if r.needs)


def test_collect_copies_the_run_whole_or_not_at_all(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = study.Run("ce", 0)
    files = [paths.metrics("train-ce-s0"), paths.train_curves("ce", 0), paths.metrics("eval-ce-s0"),
             paths.sweep("ce", 0), paths.metrics("edit-ce-s0"), paths.resolved_params(paths.model("ce", 0))]
    for i, f in enumerate(files[:-1]):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"file": i}))
    with pytest.raises(study.StageError, match="without models/var-ce-s0.params.json"):
        study.collect("s", run, {"commit": "abc"})
    assert not paths.study("s").joinpath("runs").exists() or \
        not any(paths.study("s").joinpath("runs").iterdir())
    files[-1].parent.mkdir(parents=True, exist_ok=True)
    files[-1].write_text("{}")
    paths.eval_plots("ce", 0).mkdir(parents=True)
    (paths.eval_plots("ce", 0) / "per_sample.json").write_text("[1]")
    (paths.eval_plots("ce", 0) / "figure.png").write_bytes(b"png")
    target = study.collect("s", run, {"commit": "abc"})
    assert target == paths.study_run("s", "ce", 0)
    assert json.loads((target / "eval.json").read_text()) == {"file": 2}
    assert sorted(p.name for p in (target / "eval").iterdir()) == ["per_sample.json"]
    assert json.loads((target / "provenance.json").read_text()) == {"commit": "abc"}
    assert [p.name for p in target.parent.iterdir()] == ["ce-s0"]  # no temp folder left


def test_only_selects_runs_and_the_models_they_build_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = params_from_yaml(
        seeds=[0, 1], variants={"ce": {"loss": "ce"}, "ls": {"loss": "ls"}},
        derived={"up_teacher": {"loss": "up", "reference": "teacher"}}, post_hoc=["up_teacher"])
    runs = study.plan(params)
    picked = [r.tag for r in study.select(runs, ["up_teacher+ts-s1"])]
    assert picked == ["ce-s1", "up_teacher-s1", "up_teacher+ts-s1"]
    assert [r.tag for r in study.select(runs, ["ls-*", "*-s0"])] == [
        "ce-s0", "ls-s0", "up_teacher-s0", "up_teacher+ts-s0", "ls-s1"]
    assert study.select(runs, None) == runs
    with pytest.raises(study.StageError, match="no run of the profile matches"):
        study.select(runs, ["kd*"])


def test_checkout_check_allows_what_dvc_writes_and_refuses_code_changes(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.chdir(tmp_path)

    def git(*args):
        subprocess.run(["git", *args], check=True, capture_output=True)

    git("init", "-q")
    for name in ("params.yaml", "profile.yaml", "dvc.lock", "metrics/tokenizer.json", "up/model.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("a: 1\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    # `dvc repro` of the shared stages rewrites the lock and the metrics: still the commit's code
    for name in ("dvc.lock", "metrics/tokenizer.json"):
        (tmp_path / name).write_text("b: 2\n")
    assert len(study.check_checkout(tmp_path / "profile.yaml")) == 40
    (tmp_path / "up/model.py").write_text("b: 2\n")
    with pytest.raises(study.StageError, match=r"uncommitted changes \(up/model.py\)"):
        study.check_checkout(tmp_path / "profile.yaml")
