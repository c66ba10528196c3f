"""DDP: two gloo processes under torchrun train the same weights as one process
on the combined batch (the global batch is sharded, gradients are averaged)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.project import make_project, tiny_params, train_tiny
from up.io import load_torch

TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_processes_match_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path)
    # cond_drop > 0: the dropout mask is drawn per global batch, so it matches too.
    params = tiny_params(train={"steps": 4, "batch_size": 8, "cond_drop": 0.25,
                                "save_every": 2})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    path = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                         os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    done = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "stages.cli", "train",
         "--variant", "ce", "--seed", "0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = load_torch(tmp_path / "models" / "var-ce-s0.pt")["state_dict"]

    one = train_tiny(tmp_path, params, "ce", "single.pt").model["state_dict"]
    init = train_tiny(tmp_path, tiny_params(train={"steps": 1, "lr": 1e-12}), "ce", "init.pt")
    moved = 0.0
    for name, value in one.items():
        assert torch.allclose(two[name], value, rtol=0, atol=2e-6), name
        moved = max(moved, float((value - init.model["state_dict"][name]).abs().max()))
    assert moved > 1e-3  # the runs trained: equality is not that of two untouched inits
