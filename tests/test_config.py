import pytest
import yaml
from pydantic import BaseModel

from tests.project import ROOT, copy_project, run
from up.core.params import Params, Section


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return copy_project(tmp_path_factory.mktemp("cfg") / "p")


PREPARE, TRAIN = ["up", "prepare"], ["up", "train", "--variant", "ce"]


@pytest.mark.parametrize("command, section, key, value, expected", [
    (PREPARE, "train", "lr", "fast", "train.lr = 'fast'"),
    (PREPARE, "tokenizer", "vocab_size", 1, "tokenizer.vocab_size = 1"),
    (PREPARE, "data", "source", "imagenet-21k", "data.source = 'imagenet-21k'"),
    (PREPARE, "data", "colour", True, "data.colour = True"),
    (PREPARE, "variants", "up", {"kappa": 1.0}, "variants.up.loss = missing"),
    # A loss's settings are its declaration's (up/training/losses.py): a run checks every
    # variant's before its work; stages that run no loss do not depend on the losses.
    (TRAIN, "variants", "up", {"loss": "up", "kappa": -1},
     "error: params.yaml: variants.up.kappa = -1: Input should be greater than 0\n"),
    (TRAIN, "variants", "ls", {"loss": "ls", "alpha": 0.1},
     "error: params.yaml: variants.ls.alpha = 0.1: Extra inputs are not permitted\n"),
    (TRAIN, "variants", "up", {"loss": "up", "reference": "teacher"},
     "error: params.yaml: variants.up needs the teacher model: declare it under `derived`\n"),
])
def test_bad_params_exit_2_and_write_nothing(project, command, section, key, value, expected):
    params = yaml.safe_load((project / "params.yaml").read_text())
    original = (project / "params.yaml").read_text()
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        result = run(command, project, check=False)
    finally:
        (project / "params.yaml").write_text(original)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not any((project / d).exists() for d in ("data", "metrics", "models", "checkpoints"))


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


# -- params.yaml is the one source of every value ---------------------------------------

PARAMS_FILES = [ROOT / "params.yaml", *sorted((ROOT / "profiles").glob("*.yaml"))]


def _loss_models() -> dict[str, type[BaseModel]]:
    """Each declared loss's settings model (a variant's keys), by its `loss` tag."""
    from up.training.losses import DECLARATIONS

    return {name: declared.params for name, declared in DECLARATIONS.items()}


def _unspelled(model: type[BaseModel], given: dict, where: str) -> list[str]:
    """The keys ``model`` knows that the params file mapping ``given`` leaves out."""
    missing = []
    for name, field in model.model_fields.items():
        if name not in given:
            missing.append(f"{where}{name}")
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            missing += _unspelled(field.annotation, given[name], f"{where}{name}.")
    return missing


def _defaults(model: type[BaseModel], where: str) -> list[str]:
    """The keys ``model`` (and the sections it holds) gives a default."""
    found = []
    for name, field in model.model_fields.items():
        if not field.is_required():
            found.append(f"{where}{name}")
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found += _defaults(field.annotation, f"{where}{name}.")
    return found


def _runs(spelled: dict) -> list[tuple[str, dict]]:
    return [(f"{group}.{name}", entry) for group in ("variants", "derived")
            for name, entry in (spelled.get(group) or {}).items()]


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: p.name)
def test_params_files_spell_every_key(path):
    """params.yaml and every profile (a complete params.yaml) write out every key the
    code knows: each section's, and each variant's loss settings."""
    spelled = yaml.safe_load(path.read_text())
    missing = _unspelled(Params, spelled, "")
    losses = _loss_models()
    for where, entry in _runs(spelled):
        missing += _unspelled(losses[entry["loss"]], entry, f"{where}.")
    assert not missing, f"{path.name} lacks {missing}"


def test_code_defaults_are_params_yaml_values():
    """No value hides in code: up/core/params.py's sections have no defaults, and each
    loss's settings default (what a variant may omit) to the values of params.yaml's
    first variant of that loss; a loss with defaults has one there (one without, like
    the study's `kd`, may be absent)."""
    spelled = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert _defaults(Params, "") == [], "params.py keeps defaults: params.yaml is their one source"
    first = {}
    for where, entry in _runs(spelled):
        first.setdefault(entry["loss"], (where, entry))
    differ = []
    for loss, model in _loss_models().items():
        if loss not in first:
            optional = [n for n, f in model.model_fields.items() if not f.is_required()]
            assert not optional, f"loss {loss!r} defaults {optional} but params.yaml has no variant of it"
            continue
        where, entry = first[loss]
        typed = model(**entry)
        differ += [f"{where}.{name}: default {field.get_default(call_default_factory=True)!r}, "
                   f"params.yaml {getattr(typed, name)!r}"
                   for name, field in model.model_fields.items() if not field.is_required()
                   and field.get_default(call_default_factory=True) != getattr(typed, name)]
    assert not differ, differ


def test_the_checks_see_a_default_and_an_unspelled_key():
    class Inner(Section):
        kept: int = 3

    class Outer(Section):
        inner: Inner
        given: int

    assert _defaults(Outer, "") == ["inner.kept"]
    assert _unspelled(Outer, {"inner": {}}, "") == ["inner.kept", "given"]
    assert _unspelled(Outer, {"given": 1}, "") == ["inner"]
