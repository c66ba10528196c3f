"""DDP: two gloo processes under torchrun train the same weights as one process
on the combined batch (the global batch is sharded, gradients are averaged),
and a run checkpointed on one process resumes on two."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.project import make_project, params_dict, tiny_params, train_tiny
from tests.test_train import Interrupted, failing_loss
from up.core.io import load_torch

TORCHRUN = Path(sys.executable).parent / "torchrun"


def torchrun_train(root: Path, variant: str) -> subprocess.CompletedProcess:
    """`up train` in ``root`` on two gloo processes."""
    path = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                         os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    done = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "stages.cli", "train",
         "--variant", variant, "--seed", "0"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_processes_match_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path)
    # cond_drop > 0: the dropout mask is drawn per global batch, so it matches too.
    params = params_dict(**tiny_params(train={"steps": 4, "batch_size": 8, "cond_drop": 0.25,
                                              "save_every": 2}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    torchrun_train(tmp_path, "ce")
    two = load_torch(tmp_path / "models" / "var-ce-s0.pt")["state_dict"]

    one = train_tiny(tmp_path, params, "ce", "single.pt").model["state_dict"]
    init = train_tiny(tmp_path, tiny_params(train={"steps": 1, "lr": 1e-12}), "ce", "init.pt")
    moved = 0.0
    for name, value in one.items():
        assert torch.allclose(two[name], value, rtol=0, atol=2e-6), name
        moved = max(moved, float((value - init.model["state_dict"][name]).abs().max()))
    assert moved > 1e-3  # the runs trained: equality is not that of two untouched inits


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_run_checkpointed_on_one_process_resumes_on_two(tmp_path, monkeypatch):
    """The fingerprint holds what a run computes, not how it is launched: a run killed
    on one process (threads 1, bf16 on) resumes on two (threads 2, bf16 off) and ends
    where an uninterrupted run ends. `up` refits its temperatures every 2 steps, so the
    sharded temperature fit is part of what must agree."""
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path)
    params = params_dict(**tiny_params(train={"steps": 6, "batch_size": 8, "cond_drop": 0.25,
                                              "save_every": 2}, up={"calib_every": 2}))
    failing_loss(monkeypatch, at_call=5, action="interrupt")  # dies in step 5
    with pytest.raises(Interrupted):
        train_tiny(tmp_path, params, "up", "checkpoints/var-up-s0.pt")
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert load_torch(tmp_path / "checkpoints/var-up-s0.pt")["step"] == 4

    relaunched = {**params, "threads": 2, "train": {**params["train"], "bf16": False}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(relaunched))
    done = torchrun_train(tmp_path, "up")
    assert "at step 4/6" in done.stdout
    two = load_torch(tmp_path / "models" / "var-up-s0.pt")
    one = train_tiny(tmp_path, params, "up", "whole.pt").model
    for name, value in one["state_dict"].items():
        assert torch.allclose(two["state_dict"][name], value, rtol=0, atol=2e-6), name
    assert torch.allclose(two["temperatures"], one["temperatures"], rtol=1e-6)
    assert not torch.equal(one["temperatures"], torch.ones_like(one["temperatures"]))
