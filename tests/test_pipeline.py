"""End to end: the real `dvc repro` and `dvc exp run` on a tiny configuration."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
import yaml

from tests.project import TINY, copy_project, env, run
from up.evaluation.report import HEADLINE_KEYS


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("e2e") / "p",
                           {**TINY, "variants": {"ce": {"loss": "ce"},
                                                 "up": {"loss": "up", "calib_every": 2},
                                                 "up_emp": {"loss": "up",
                                                            "reference": "empirical"}},
                            "derived": {"up_teacher": {"loss": "up", "reference": "teacher"}}})
    run(["dvc", "repro"], project)
    return project


def metrics_of(project, name: str) -> dict:
    return json.loads((project / f"metrics/eval-{name}-s0.json").read_text())


def test_repro_writes_every_stage_output(repro):
    for rel in ["data/prepared/images.npy", "models/tokenizer.pt", "data/tokens/train.npy",
                "models/evaluator.pt", "models/var-ce-s0.pt", "models/var-up-s0.pt",
                "samples/ce-s0/samples.pt", "samples/up-s0/grid.png",
                "results/summary.md", "results/summary.json"]:
        assert (repro / rel).is_file(), rel
    for variant in ("ce", "up"):
        metrics = json.loads((repro / f"metrics/eval-{variant}-s0.json").read_text())
        for key in ("fid", "kid_mean", "is_mean", "precision", "recall", "ece", "diversity"):
            assert isinstance(metrics[key], float), key
    summary = json.loads((repro / "results/summary.json").read_text())["variants"]
    assert list(summary) == ["ce", "ls", "lr", "up", "up_emp", "ce+ts", "ce+ts-sampler", "up_teacher"]
    reference = json.loads((repro / "metrics/reference-s0.json").read_text())
    assert reference["context"] in ("parent", "parent_class")
    assert reference["heldout_nll"] == min(r["heldout_nll"] for r in reference["candidates"])
    assert summary["ce"]["metrics"]["fid"]["mean"] == metrics_of(repro, "ce")["fid"]
    status = run(["dvc", "status"], repro).stdout
    assert "up to date" in status or status.strip() == "", status


def test_metrics_show_lists_every_stage(repro):
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repro).stdout)
    files = next(iter(shown.values()))["data"]
    assert {"metrics/prepare.json", "metrics/tokenizer.json", "metrics/eval-up-s0.json"} <= set(files)
    prepare = files["metrics/prepare.json"]["data"]
    assert prepare["splits"]["train"]["total"] + prepare["splits"]["val"]["total"] \
        + prepare["splits"]["test"]["total"] == 1797


def test_study_runs_in_lanes_and_keeps_each_run_whole(repro, tmp_path):
    """`up study` on a committed copy of the tiny project: every run's artifacts under
    results/<study>/runs/<run>/ with the commit it ran at; a second call skips them; a
    dirty checkout is refused before any work."""
    project = tmp_path / "p"
    shutil.copytree(repro, project, ignore=shutil.ignore_patterns(".dvc"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params.update(variants={"ce": {"loss": "ce"}}, derived={"ce+ts": {"loss": "ts"}})
    (project / "profiles/tiny.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "study profile"], project)
    head = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    study = ["up", "study", "tiny", "--profile", "profiles/tiny.yaml", "--lanes", "2"]
    out = run(study, project).stdout
    for tag in ("ce-s0", "ce+ts-s0"):
        folder = project / "results/tiny/runs" / tag
        assert {f.name for f in folder.iterdir()} == {"train.json", "curve.tsv", "eval.json", "eval",
                                                      "sweep.json", "edit.json", "params.json",
                                                      "provenance.json"}
        provenance = json.loads((folder / "provenance.json").read_text())
        assert provenance["commit"] == head and provenance["profile"] == "profiles/tiny.yaml"
        assert json.loads((folder / "eval.json").read_text()) == \
            json.loads((project / f"metrics/eval-{tag}.json").read_text())
        assert (folder / "eval/per_sample.json").is_file()
    assert "ce-s0: model trained" not in out  # the repro's ce model had these params
    assert "already in" in run(study, project).stdout
    (project / "README.md").write_text("changed\n")
    refused = run(study, project, check=False)
    assert refused.returncode == 1 and "uncommitted changes (README.md" in refused.stderr


@pytest.fixture(scope="module")
def experiment(repro):
    """The committed tiny run plus one `dvc exp run -S` experiment named lowdisp."""
    run(["git", "add", "-A"], repro)
    run(["git", "commit", "-qm", "baseline run"], repro)
    run(["dvc", "exp", "run", "-n", "lowdisp", "-S", "variants.up.lambda_disp=0.05"], repro)
    return "lowdisp"


HEADLINE = "|".join(HEADLINE_KEYS)


def named(tree, name: str) -> list[dict]:
    """Every dict of a `dvc ... --json` tree whose "name" is ``name``."""
    if isinstance(tree, dict):
        found = [tree] if tree.get("name") == name else []
        return found + [d for v in tree.values() for d in named(v, name)]
    if isinstance(tree, list):
        return [d for v in tree for d in named(v, name)]
    return []


def test_exp_run_with_override_is_listed(repro, experiment):
    rows = json.loads(run(["dvc", "exp", "show", "--json"], repro).stdout)
    data = next(d for d in named(rows, experiment) if "data" in d)["data"]
    assert data["params"]["params.yaml"]["data"]["variants"]["up"]["lambda_disp"] == 0.05
    headline = data["metrics"]["results/metrics.json"]["data"]
    assert set(headline["up"]) == set(HEADLINE_KEYS)
    eval_up = data["metrics"]["metrics/eval-up-s0.json"]["data"]
    assert headline["up"]["fid"] == pytest.approx(eval_up["fid"])
    # The README's command: only the headline figures of each variant, one row per experiment.
    table = run(["dvc", "exp", "show", "--csv", "--drop", ".*", "--keep",
                 rf"Experiment|[^/:]+\.({HEADLINE})$"], repro).stdout.splitlines()
    declared = yaml.safe_load((repro / "params.yaml").read_text())
    variants = [*declared["variants"], *declared["derived"]]
    header = table[0].split(",")
    assert header == ["Experiment"] + [f"{v}.{k}" for v in variants for k in HEADLINE.split("|")]
    assert any(line.startswith(experiment) for line in table[1:])


def test_plots_diff_overlays_the_experiment_curves(repro, experiment):
    shown = json.loads(run(["dvc", "plots", "diff", "HEAD", experiment, "--json",
                            "--targets", "plots/train/up-s0.tsv"], repro).stdout)
    revisions = {rev for plot in shown["data"]["plots/train/up-s0.tsv"]
                 for rev in plot["revisions"]}
    assert revisions == {"HEAD", experiment}


def test_prepare_then_exp_run_switches_source(tmp_path):
    project = copy_project(tmp_path / "p")
    run(["dvc", "repro", "prepare"], project)
    first = json.loads((project / "metrics/prepare.json").read_text())
    assert first["source"] == "mnist5k" and first["images"] == 5000
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "prepared"], project)
    run(["dvc", "exp", "run", "-n", "digits", "-S", "data.source=digits", "prepare"], project)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    data = next(d for d in named(shown, "digits") if "data" in d)["data"]
    assert data["metrics"]["metrics/prepare.json"]["data"]["images"] == 1797


def _launch_killed_repro(project, stage, checkpoint):
    """Start `dvc repro STAGE`, SIGKILL its whole process group once a checkpoint exists."""
    proc = subprocess.Popen(["dvc", "repro", stage], cwd=project, env=env(project.parent),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the stage finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_killed_training_resumes_through_dvc_repro(tmp_path):
    """What a user sees after a kill: `dvc repro` again resumes from the checkpoint
    kept outside the stage outputs and ends with the weights and curve of an
    unbroken run (a forced rerun from scratch, once the checkpoint is removed)."""
    tiny = {**TINY, "train": {**TINY["train"], "steps": 40, "save_every": 4, "log_every": 4},
            "variants": {"ce": {"loss": "ce"}}}
    project = copy_project(tmp_path / "p", tiny)
    run(["dvc", "repro", "tokenize", "reference"], project)
    checkpoint = project / "checkpoints/var-ce-s0.pt"
    _launch_killed_repro(project, "train@ce-0", checkpoint)
    killed_at = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < killed_at < 40 and not (project / "models/var-ce-s0.pt").exists()
    resumed = run(["dvc", "repro", "train@ce-0"], project)
    assert f"resuming checkpoints/var-ce-s0.pt at step {killed_at}/40" in resumed.stdout
    assert not checkpoint.exists()  # removed once the outputs are written
    a = torch.load(project / "models/var-ce-s0.pt", weights_only=True)["state_dict"]
    curve = (project / "plots/train/ce-s0.tsv").read_text()
    run(["dvc", "repro", "-f", "train@ce-0"], project)  # from scratch: no checkpoint left
    b = torch.load(project / "models/var-ce-s0.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (project / "plots/train/ce-s0.tsv").read_text() == curve
