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
