import pytest
import yaml

from tests.project import copy_project, run


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return copy_project(tmp_path_factory.mktemp("cfg") / "p")


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "lr", "fast", "train.lr = 'fast'"),
    ("tokenizer", "vocab_size", 1, "tokenizer.vocab_size = 1"),
    ("data", "source", "imagenet-21k", "data.source = 'imagenet-21k'"),
    ("data", "colour", True, "data.colour = True"),
    ("variants", "up", {"loss": "up", "kappa": -1}, "variants.up.kappa = -1"),
])
def test_bad_params_exit_2_and_write_nothing(project, section, key, value, expected):
    params = yaml.safe_load((project / "params.yaml").read_text())
    original = (project / "params.yaml").read_text()
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        result = run(["up", "prepare"], project, check=False)
    finally:
        (project / "params.yaml").write_text(original)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project / "data").exists() and not (project / "metrics").exists()


def test_env_override_is_validated(project):
    result = run(["env", "UP_TRAIN__STEPS=0", "up", "prepare"], project, check=False)
    assert result.returncode == 2 and "train.steps = '0'" in result.stderr


def test_unknown_variant_is_rejected(project):
    result = run(["up", "train", "--variant", "nope"], project, check=False)
    assert result.returncode == 2 and "variant 'nope' is not declared" in result.stderr


def test_stage_failures_are_one_line_errors_with_exit_code_1(tmp_path):
    """As a new user would meet them: a diverging evaluator and a truncated model file
    end in one `error:` line and exit code 1, not a traceback."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import torch

    from up.core.io import save_torch
    from up.models.tokenizer import MultiScaleVQVAE

    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    up = str(Path(sys.executable).parent / "up")
    tok = MultiScaleVQVAE(in_channels=1, widths=[8, 8], res_blocks=0, latent_channels=4,
                          vocab_size=16, patch_nums=[1, 2, 4, 8], phi_share=2)
    save_torch({"config": tok.config, "state_dict": tok.state_dict(),
                "code_to_cluster": torch.arange(16) % 4, "num_clusters": 4},
               tmp_path / "models" / "tokenizer.pt")
    (tmp_path / "models" / "var-ce-s0.pt").write_bytes(b"PK\x03\x04 truncated")

    def one_line_error(*args: str, **env: str) -> str:
        done = subprocess.run([up, *args], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **env})
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, done.stderr[-2000:]
        return lines[0]

    line = one_line_error("sample", "--variant", "ce", "--seed", "0")
    assert line.startswith("error: sample: VAR checkpoint models/var-ce-s0.pt is unreadable")
    subprocess.run([up, "prepare"], cwd=tmp_path, check=True, capture_output=True,
                   env={**os.environ, "UP_DATA__SOURCE": "digits", "UP_DATA__IMAGE_SIZE": "16"})
    line = one_line_error("evaluator", UP_EVALUATOR__LR="1e12", UP_EVALUATOR__STEPS="40",
                          UP_DATA__SOURCE="digits", UP_DATA__IMAGE_SIZE="16")
    assert line.startswith("error: evaluator: non-finite loss at step")
