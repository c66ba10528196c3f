"""The scale-up profiles are valid params files and build the models they promise."""

from pathlib import Path

import pytest
import torch

from up.config import load_params
from up.transformer import VAR

PROFILES = sorted((Path(__file__).resolve().parents[1] / "profiles").glob("*.yaml"))
GPU_PROFILES = [p for p in PROFILES if p.stem != "overconfident"]


def _load(profile: Path, tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(profile.read_text())
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return load_params()


@pytest.mark.parametrize("profile", GPU_PROFILES, ids=[p.stem for p in GPU_PROFILES])
def test_gpu_profile_validates(profile, tmp_path, monkeypatch):
    params = _load(profile, tmp_path, monkeypatch)
    assert params.device == "cuda"
    assert {"ce", "ls", "lr", "up"} <= set(params.variants)


def test_overconfident_profile_is_the_study(tmp_path, monkeypatch):
    """The study's profile: every reference and baseline, 3 seeds, one thread, the
    small-data regime, and the default run's data/tokenizer/evaluator settings (so
    DVC reuses them)."""
    profile = PROFILES[0].with_name("overconfident.yaml")
    params = _load(profile, tmp_path, monkeypatch)
    default = _load(profile.parents[1] / "params.yaml", tmp_path, monkeypatch)
    assert params.seeds == [0, 1, 2] and params.threads == 1
    assert params.train.images_per_class == 50 and params.train.calib_fraction > 0
    refs = {getattr(v, "reference", None) for v in params.runs.values()}
    assert {"calibrated", "teacher", "empirical"} <= refs
    assert {"ce", "ls", "lr", "ce+ts"} <= set(params.runs)
    for section in ("data", "tokenizer", "evaluator"):
        assert getattr(params, section) == getattr(default, section), section


def test_imagenet_profile_is_var_d16(tmp_path, monkeypatch):
    params = _load(Path(PROFILES[0]).with_name("imagenet256-d16.yaml"), tmp_path, monkeypatch)
    tok, arch = params.tokenizer, params.transformer
    assert tok.patch_nums == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16] and tok.vocab_size == 4096
    assert params.data.image_size // tok.downsample == tok.patch_nums[-1]
    with torch.device("meta"):
        model = VAR(tok.vocab_size, tok.latent_channels, tok.patch_nums, num_classes=1000,
                    depth=arch.depth, width=arch.width, heads=arch.heads,
                    mlp_ratio=arch.mlp_ratio, drop_path=arch.drop_path, qk_norm=arch.qk_norm)
    assert abs(model.num_parameters() / 310e6 - 1) < 0.02  # VAR-d16's published size
