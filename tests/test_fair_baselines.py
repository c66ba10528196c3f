"""Fair baselines: `ce+ts` as a calibrator (its base model's samples, its own scores),
`ce+ts-sampler`, post-hoc `<run>+ts` runs, and the sweep's temperature and truncation axes."""

import pytest
import torch
import yaml

from tests import test_sampling
from tests.project import make_project, params_from_yaml, tiny_params
from tests.test_sampling import CLASSES, CODE_TO_CLUSTER, LABELS, build_models, save_models
from up.core.errors import StageError
from up.core.io import load_torch, save_torch
from up.core.params import ParamsError
from up.core.runtime import setup
from up.generation.sampler import filter_logits, guidance_ratio
from up.models.transformer import load_var_for_sampling

TEMPS = torch.tensor([0.5, 2.0, 3.0, 0.4])  # far from 1: every scale's distribution changes


@pytest.fixture(scope="module")
def models():
    return build_models()


def draw(models, **kwargs):
    return test_sampling.draw(models, seed=7, **kwargs)


@torch.no_grad()
def guided_logits(models, indices, guidance=2.0):
    """Per scale, the guided logits of the generated tokens by one full forward (no sampler
    code): cond and null-class passes mixed by VAR's formula."""
    var, tok = models
    x = tok.indices_to_var_input(indices)
    cond, uncond = var(LABELS, x), var(torch.full_like(LABELS, CLASSES), x)
    out = []
    for k, (begin, end) in enumerate(var.begin_ends):
        t = guidance_ratio(guidance, "linear", k, len(var.begin_ends))
        out.append(((1 + t) * cond[:, begin:end] - t * uncond[:, begin:end], cond[:, begin:end]))
    return out


def entropy(logits):
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.8, 5)])
def test_calibrator_draws_the_base_models_tokens_and_scores_them_at_its_temperatures(
        models, temperature, top_k):
    base_images, base, base_unc = draw(models, temperature=temperature, top_k=top_k)
    images, tokens, unc = draw(models, temperature=temperature, top_k=top_k,
                               scale_temperatures=TEMPS, sample_at_temperatures=False)
    assert torch.equal(images, base_images)
    assert all(torch.equal(a, b) for a, b in zip(tokens, base, strict=True))
    for k, (guided, cond) in enumerate(guided_logits(models, tokens)):
        shape = unc["maps"]["entropy"][k].shape
        by_hand = entropy(guided / (temperature * TEMPS[k])).view(shape)
        torch.testing.assert_close(unc["maps"]["entropy"][k], by_hand, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(unc["maps"]["cond_entropy"][k],
                                   entropy(cond / TEMPS[k]).view(shape), rtol=1e-4, atol=1e-5)
        if k > 0:  # the first scale's single token can be near-deterministic either way
            assert (unc["maps"]["entropy"][k] - base_unc["maps"]["entropy"][k]).abs().max() > 1e-2
    # the sampler variant draws at the temperatures: other tokens from the same seed
    _, drawn, drawn_unc = draw(models, temperature=temperature, top_k=top_k,
                               scale_temperatures=TEMPS, sample_at_temperatures=True)
    assert not all(torch.equal(a, b) for a, b in zip(drawn, base, strict=True))
    for k, (guided, _) in enumerate(guided_logits(models, drawn)):  # scored as the calibrator
        by_hand = entropy(guided / (temperature * TEMPS[k]))
        torch.testing.assert_close(drawn_unc["maps"]["entropy"][k],
                                   by_hand.view(drawn_unc["maps"]["entropy"][k].shape),
                                   rtol=1e-4, atol=1e-5)


def _checkpoint(var, **extra):
    return dict(config=var.config(), state_dict=var.state_dict(), ema_state_dict=None,
                temperatures=None, step=1, **extra)


def test_sample_stage_keeps_the_base_models_images_for_the_calibrator(tmp_path, monkeypatch,
                                                                     models):
    """The sample stage reads the semantics from the `ts` checkpoint: ce+ts's images are
    ce's bitwise, ce+ts-sampler's are not; both record ce+ts's entropies."""
    from stages import sample as stage
    from up.core.params import load_params

    var, tok = models
    params = params_from_yaml(device="cpu", sample={"n_per_class": 2, "batch_size": 5,
                                                    "grid_per_class": 2}).model_dump()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    save_models(models, tmp_path, with_ce=False)
    save_torch(_checkpoint(var, variant={"loss": "ce"}), tmp_path / "models" / "var-ce-s0.pt")
    for name, at in (("ce+ts", False), ("ce+ts-sampler", True)):
        save_torch(_checkpoint(var, variant={"name": name, "loss": "ts",
                                             "sample_at_temperatures": at},
                               logit_temperatures=TEMPS),
                   tmp_path / "models" / f"var-{name}-s0.pt")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    out = {}
    for name in ("ce", "ce+ts", "ce+ts-sampler"):
        stage.run(load_params(), name, 0)
        out[name] = load_torch(tmp_path / "samples" / f"{name}-s0" / "samples.pt")
    assert torch.equal(out["ce+ts"]["images"], out["ce"]["images"])
    assert not torch.equal(out["ce+ts-sampler"]["images"], out["ce"]["images"])
    assert out["ce+ts"]["config"]["sample_at_temperatures"] is False
    assert out["ce+ts-sampler"]["config"]["sample_at_temperatures"] is True
    h = {name: out[name]["uncertainty"]["image"]["entropy"] for name in out}
    assert (h["ce+ts"] - h["ce"]).abs().max() > 1e-2


def test_a_ts_checkpoint_without_its_sampling_setting_is_refused(tmp_path, models):
    var, _ = models
    path = tmp_path / "old.pt"
    save_torch(_checkpoint(var, variant={"loss": "ts"}, logit_temperatures=TEMPS), path)
    with pytest.raises(StageError, match="sample_at_temperatures"):
        load_var_for_sampling(path)
    save_torch(_checkpoint(var, variant={"loss": "ce"}), path)
    assert load_var_for_sampling(path)[1:] == (None, False)


# -- post-hoc runs ---------------------------------------------------------------------------

def test_post_hoc_runs_resolve_to_ts_over_their_base():
    from up.training.losses import TSParams, variant_params

    params = params_from_yaml(post_hoc=["up", "ls"])
    assert list(params.runs)[-2:] == ["up+ts", "ls+ts"]
    assert variant_params(params, "up+ts") == TSParams(loss="ts", sample_at_temperatures=False)
    assert variant_params(params, "ce+ts-sampler").sample_at_temperatures is True
    assert [params.base(n) for n in ("up+ts", "ls+ts", "ce+ts", "ce")] == ["up", "ls", "ce", None]
    with pytest.raises(ParamsError, match="'lr\\+ts' is not declared"):
        params.variant("lr+ts")
    for bad in (["ce+ts"], ["nope"], ["up", "up"]):  # a ts run, an unknown run, a repeat
        with pytest.raises(ValueError, match="post_hoc"):
            params_from_yaml(post_hoc=bad)
    with pytest.raises(ValueError, match="already"):  # ce+ts is declared under derived
        params_from_yaml(post_hoc=["ce"])


def test_post_hoc_run_fits_its_temperatures_on_its_base_model(tmp_path, monkeypatch):
    """ls+ts keeps ls's weights, and its temperatures are those a `ts` run fits over ls
    (here: a derived ts run whose teacher is ls), not those of the teacher ce."""
    import stages.train

    monkeypatch.chdir(tmp_path)
    make_project(tmp_path)
    setup(0, 1)
    base = tiny_params(train={"steps": 4})
    base["variants"] = {"ce": {"loss": "ce"}, "ls": {"loss": "ls", "epsilon": 0.3}}
    post_hoc = params_from_yaml(**base, post_hoc=["ls"])
    for name in ("ce", "ls", "ce+ts", "ls+ts"):
        stages.train.run(post_hoc, name, 0)
    as_teacher = params_from_yaml(**{**base, "derived": {"ls_ts": {"loss": "ts"}}}, teacher="ls")
    stages.train.run(as_teacher, "ls_ts", 0)
    model = {name: load_torch(tmp_path / "models" / f"var-{name}-s0.pt")
             for name in ("ls", "ce+ts", "ls+ts", "ls_ts")}
    for key, value in model["ls"]["state_dict"].items():
        assert torch.equal(value, model["ls+ts"]["state_dict"][key]), key
    temps = model["ls+ts"]["logit_temperatures"]
    assert torch.equal(temps, model["ls_ts"]["logit_temperatures"])
    assert not torch.allclose(temps, model["ce+ts"]["logit_temperatures"])
    assert model["ls+ts"]["variant"] == {"name": "ls+ts", "loss": "ts",
                                         "sample_at_temperatures": False}


# -- sweep axes ------------------------------------------------------------------------------

def test_sweep_rows_follow_the_three_axes():
    from stages.sweep import sweep_settings, truncation_top_k

    params = params_from_yaml(sample={"guidance": 1.5, "temperature": 1.0, "top_k": 0,
                                      "top_p": 1.0},
                              sweep={"guidance": [3.0, 0.5], "temperatures": [1.25, 0.8],
                                     "temperature_variants": ["ce"], "truncation": True,
                                     "top_k_fraction": 0.22, "top_p": 0.95})
    base = {"guidance": 1.5, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    rows = sweep_settings(params.sweep, params.sample, "ce", 4096)
    assert rows == [{"axis": "guidance", **base, "guidance": 0.5},
                    {"axis": "guidance", **base, "guidance": 3.0},
                    {"axis": "temperature", **base, "temperature": 0.8},
                    {"axis": "temperature", **base, "temperature": 1.25},
                    {"axis": "truncation", **base, "top_k": 901, "top_p": 0.95}]
    assert [r["axis"] for r in sweep_settings(params.sweep, params.sample, "ls", 512)] == \
        ["guidance", "guidance", "truncation"]  # no temperature axis for ls
    assert sweep_settings(params.sweep, params.sample, "ls", 512)[-1]["top_k"] == 113
    assert truncation_top_k(0.001, 16) == 1  # never 0, which would mean untruncated
    with pytest.raises(ValueError, match="temperature_variants"):
        params_from_yaml(sweep={"temperature_variants": ["nope"]})


def test_truncated_row_samples_only_codes_in_the_top_k_of_their_step(models):
    from stages.sweep import truncation_top_k

    V = CODE_TO_CLUSTER.numel()
    k = truncation_top_k(0.22, V)  # round(3.52) = 4
    assert k == 4
    logits = torch.randn(3, 5, V)
    kept = torch.isfinite(filter_logits(logits, top_k=k)).sum(-1)
    assert (kept == k).all()
    _, tokens, _ = draw(models, top_k=k, top_p=0.95)
    _, untruncated, _ = draw(models)
    for idx, (guided, _) in zip(tokens, guided_logits(models, tokens), strict=True):
        rank = (guided > guided.gather(-1, idx.flatten(1)[..., None])).sum(-1)
        assert (rank < k).all()
    assert not all(torch.equal(a, b) for a, b in zip(tokens, untruncated, strict=True))
