"""Sampling: KV cache, determinism, guidance, truncation, recorded uncertainty, stages."""

import json
import math

import pytest
import torch
import yaml
from PIL import Image

from tests.project import ROOT
from up.core.io import load_torch, save_torch
from up.generation.sampler import (
    batch_generator,
    compile_for_sampling,
    filter_logits,
    guidance_ratio,
    sample,
    sample_tokens,
)
from up.generation.scores import aggregate
from up.models.tokenizer import MultiScaleVQVAE
from up.models.transformer import VAR

PATCH_NUMS = (1, 2, 3, 4)
V, C, CLASSES, CLUSTERS = 16, 8, 5, 4
CODE_TO_CLUSTER = torch.arange(V) % CLUSTERS
LABELS = torch.tensor([0, 1, 2, 3, 4, 1])


def build_models(seed: int = 0) -> tuple[VAR, MultiScaleVQVAE]:
    """A random tiny tokenizer (8x8 images, 4x4 latent) and a random tiny VAR
    with weights perturbed away from VAR's identity-like init, so that
    predictions depend on class and context."""
    torch.manual_seed(seed)
    tok = MultiScaleVQVAE(in_channels=1, widths=[8], res_blocks=0, latent_channels=C,
                          vocab_size=V, patch_nums=PATCH_NUMS, phi_share=2)
    var = VAR(V, C, PATCH_NUMS, CLASSES, depth=2, width=32, heads=4)
    with torch.no_grad():
        tok.quantizer.embedding.weight.normal_()
        for p in var.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return var.eval(), tok.eval()


@pytest.fixture(scope="module")
def models():
    return build_models()


def draw(models, seed=0, labels=LABELS, **kwargs):
    var, tok = models
    kwargs = {"guidance": 2.0, "guidance_schedule": "linear", **kwargs}
    return sample(var, tok, labels, generator=torch.Generator().manual_seed(seed),
                  code_to_cluster=CODE_TO_CLUSTER, num_clusters=CLUSTERS, **kwargs)


@torch.no_grad()
def teacher_forced(models, labels, indices, guidance, schedule="linear", temperature=1.0):
    """The sampled-from logits per scale, recomputed by one full forward pass on
    the generated tokens (no cache, no sampler code)."""
    var, tok = models
    x = tok.indices_to_var_input(indices)
    null = torch.full_like(labels, CLASSES)
    cond = var(torch.where(labels < 0, null, labels), x)
    uncond = var(null, x)
    out = []
    for k, (begin, end) in enumerate(var.begin_ends):
        t = guidance_ratio(guidance, schedule, k, len(PATCH_NUMS)) if (labels >= 0).any() else 0.0
        out.append(((1 + t) * cond[:, begin:end] - t * uncond[:, begin:end]) / temperature)
    return out


def test_guidance_ratio():
    assert [guidance_ratio(3.0, "linear", k, 4) for k in range(4)] == [0.0, 1.0, 2.0, 3.0]
    assert [guidance_ratio(3.0, "constant", k, 4) for k in range(4)] == [3.0] * 4


def test_filter_logits_by_hand():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw)).tolist()  # noqa: E731
    assert kept() == [True] * 4
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.6) == [True, True, False, False]  # 0.5 alone is not enough
    assert kept(top_p=0.45) == [True, False, False, False]
    assert kept(top_p=0.9) == [True, True, True, False]
    assert kept(top_k=3, top_p=0.6) == [True, True, False, False]
    assert kept(top_p=0.01) == [True, False, False, False]  # the mode always survives


def test_inverse_cdf_draw_by_hand():
    """One uniform per row, compared with the running sum: u * total in [0, 0.1) is code
    0, [0.1, 0.7) code 2 (code 1 has probability 0 and is never drawn), [0.7, 1) code 3."""
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    logits = probs.log().expand(6, 4)
    generator = torch.Generator().manual_seed(3)
    u = torch.rand(6, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = [0 if x < 0.1 else 2 if x < 0.7 else 3 for x in u.squeeze(1).tolist()]
    assert sample_tokens(logits, generator).tolist() == expected
    assert len(set(expected)) > 1  # the seed exercises more than one interval


@pytest.mark.parametrize("draw", ["inverse_cdf", "multinomial"])
def test_both_draws_follow_the_distribution(draw):
    """200,000 draws: every code's frequency within 5 standard errors of its probability;
    codes of probability 0 (also the first and the last, as truncation leaves them) never."""
    probs = torch.tensor([0.0, 0.05, 0.5, 0.0, 0.15, 0.3, 0.0])
    n = 200_000
    tokens = sample_tokens(probs.log().expand(n, -1), torch.Generator().manual_seed(0), draw)
    freq = torch.bincount(tokens, minlength=len(probs)).double() / n
    stderr = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert torch.all((freq - probs.double()).abs() <= 5 * stderr + 1e-12), freq
    assert freq[probs == 0].sum() == 0


def test_draws_differ_in_tokens_not_in_law(models):
    """sample.draw changes which tokens a seed gives, and an unknown draw is refused."""
    var, tok = models
    kwargs = dict(guidance=1.5, guidance_schedule="linear", code_to_cluster=CODE_TO_CLUSTER,
                  num_clusters=CLUSTERS)
    runs = {draw: sample(var, tok, LABELS, generator=torch.Generator().manual_seed(0),
                         draw=draw, **kwargs)[1] for draw in ("inverse_cdf", "multinomial")}
    assert any(not torch.equal(a, b) for a, b in zip(*runs.values(), strict=True))
    with pytest.raises(ValueError, match="unknown draw 'gumbel'"):
        sample(var, tok, LABELS, generator=torch.Generator().manual_seed(0), draw="gumbel", **kwargs)


def test_aggregate_by_hand():
    maps = {"entropy": [torch.tensor([[[1.0]], [[3.0]]]),
                        torch.tensor([[[2.0, 2.0], [2.0, 7.0]], [[0.0, 0.0], [0.0, 0.0]]])]}
    image, per_scale = aggregate(maps)
    torch.testing.assert_close(image["entropy"], torch.tensor([14.0 / 5, 3.0 / 5]))
    torch.testing.assert_close(per_scale["entropy"], torch.tensor([[1.0, 3.25], [3.0, 0.0]]))


def test_output_format(models):
    images, indices, unc = draw(models)
    B, K = len(LABELS), len(PATCH_NUMS)
    assert images.dtype == torch.uint8 and images.shape == (B, 1, 8, 8)
    assert [tuple(i.shape) for i in indices] == [(B, p, p) for p in PATCH_NUMS]
    assert all(i.dtype == torch.int64 and 0 <= i.min() and i.max() < V for i in indices)
    for name in ("entropy", "dispersion", "semantic_entropy"):
        assert [tuple(m.shape) for m in unc["maps"][name]] == [(B, p, p) for p in PATCH_NUMS]
        assert all(m.dtype == torch.float32 for m in unc["maps"][name])
        assert unc["image"][name].shape == (B,) and unc["per_scale"][name].shape == (B, K)
    assert all(0 <= m.min() and m.max() <= math.log(V) + 1e-5 for m in unc["maps"]["entropy"])
    _, tok = models
    torch.testing.assert_close(tok.decode(indices), images.float() / 127.5 - 1, atol=1 / 127.5,
                               rtol=0)


@pytest.mark.parametrize("guidance", [0.0, 2.5])
def test_kv_cache_equals_no_cache(models, guidance):
    images, indices, unc = draw(models, seed=3, guidance=guidance, use_cache=True)
    images2, indices2, unc2 = draw(models, seed=3, guidance=guidance, use_cache=False)
    for a, b in zip(indices, indices2, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(images, images2)
    for a, b in zip(unc["maps"]["entropy"], unc2["maps"]["entropy"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    var, _ = models
    assert all(block.attn.cache is None for block in var.blocks)


def test_compiled_blocks_sample_what_the_eager_model_samples():
    """sample.compile changes how the blocks run, not what they compute: the same seed
    gives the same tokens and (to float tolerance) the same recorded uncertainty, with
    and without the KV cache (the cached and the masked forward compile apart)."""
    eager, compiled = build_models(), build_models()
    compile_for_sampling(compiled[0])
    assert all(block._compiled_call_impl is not None for block in compiled[0].blocks)
    for use_cache in (True, False):
        _, want, unc = draw(eager, seed=4, use_cache=use_cache)
        _, got, unc2 = draw(compiled, seed=4, use_cache=use_cache)
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
        for a, b in zip(unc["maps"]["entropy"], unc2["maps"]["entropy"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert compile_for_sampling(eager[0], enabled=False) is eager[0]
    assert all(block._compiled_call_impl is None for block in eager[0].blocks)


def test_same_seed_same_images_across_thread_counts(models):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = draw(models, seed=5)
        torch.set_num_threads(2)
        two = draw(models, seed=5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0])
    assert all(torch.equal(a, b) for a, b in zip(one[1], two[1], strict=True))
    other = draw(models, seed=6)
    assert not all(torch.equal(a, b) for a, b in zip(one[1], other[1], strict=True))


@pytest.mark.parametrize("guidance, schedule, temperature", [
    (0.0, "linear", 1.0), (3.0, "linear", 1.0), (1.5, "constant", 0.7)])
def test_recorded_uncertainty_equals_recomputed(models, guidance, schedule, temperature):
    """Entropy, dispersion and semantic entropy of the distribution sampled from,
    recomputed by hand from teacher-forced logits at every position."""
    kappa = 2.0
    _, indices, unc = draw(models, seed=1, guidance=guidance, guidance_schedule=schedule,
                           temperature=temperature, kappa=kappa, top_k=3)
    logits = teacher_forced(models, LABELS, indices, guidance, schedule, temperature)
    for k, z in enumerate(logits):
        p = z.softmax(-1)
        entropy = -(p * p.log()).sum(-1)
        dispersion = (p * (1 - p)).sum(-1) / (kappa + 1)
        mass = torch.zeros(*p.shape[:-1], CLUSTERS).index_add_(-1, CODE_TO_CLUSTER, p)
        semantic = -(mass * mass.log()).sum(-1)
        shape = unc["maps"]["entropy"][k].shape
        for name, expected in [("entropy", entropy), ("dispersion", dispersion),
                               ("semantic_entropy", semantic)]:
            torch.testing.assert_close(unc["maps"][name][k], expected.view(shape),
                                       rtol=1e-4, atol=1e-5)
    if guidance > 0:  # guidance really changed the distribution at guided scales
        cond_only = teacher_forced(models, LABELS, indices, 0.0, schedule, temperature)
        h = -(cond_only[-1].softmax(-1) * cond_only[-1].log_softmax(-1)).sum(-1)
        assert (h.view_as(unc["maps"]["entropy"][-1]) - unc["maps"]["entropy"][-1]).abs().max() \
            > 1e-3


@pytest.mark.parametrize("guidance, temperature, scaled", [
    (0.0, 1.0, False), (3.0, 0.7, False), (2.0, 1.3, True)])
def test_conditional_entropy_and_surprisal_equal_a_cond_only_forward(models, guidance,
                                                                      temperature, scaled):
    """cond_entropy and surprisal are of the conditional distribution alone: one cond-only
    forward on the generated tokens, divided by the scale temperature only (neither
    guidance nor the sampling temperature)."""
    scale_t = torch.tensor([1.0, 0.8, 1.5, 1.2]) if scaled else None
    _, indices, unc = draw(models, seed=2, guidance=guidance, temperature=temperature,
                           scale_temperatures=scale_t, top_k=4)
    var, tok = models
    with torch.no_grad():
        cond = var(LABELS, tok.indices_to_var_input(indices))
    for k, (begin, end) in enumerate(var.begin_ends):
        z = cond[:, begin:end] / (1.0 if scale_t is None else scale_t[k])
        logp = z.log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        surprisal = -logp.gather(-1, indices[k].flatten(1)[..., None])[..., 0]
        shape = unc["maps"]["cond_entropy"][k].shape
        torch.testing.assert_close(unc["maps"]["cond_entropy"][k], entropy.view(shape),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(unc["maps"]["surprisal"][k], surprisal.view(shape),
                                   rtol=1e-4, atol=1e-5)
    if guidance > 0 or temperature != 1.0:  # they differ from the sampled distribution's
        assert (unc["maps"]["cond_entropy"][-1] - unc["maps"]["entropy"][-1]).abs().max() > 1e-3


def test_guidance_zero_ignores_the_null_class():
    """guidance = 0 is the conditional model alone: the null class cannot matter."""
    var, tok = build_models()
    before = draw((var, tok), seed=2, guidance=0.0)
    guided = draw((var, tok), seed=2, guidance=4.0)
    with torch.no_grad():
        var.class_emb.weight[CLASSES].normal_()
    after = draw((var, tok), seed=2, guidance=0.0)
    after_guided = draw((var, tok), seed=2, guidance=4.0)
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(guided[1], after_guided[1], strict=True))


def test_top_k_one_is_greedy(models):
    _, indices, _ = draw(models, seed=0, top_k=1)
    _, indices2, _ = draw(models, seed=123, top_k=1)
    assert all(torch.equal(a, b) for a, b in zip(indices, indices2, strict=True))
    logits = teacher_forced(models, LABELS, indices, guidance=2.0)
    for idx, z in zip(indices, logits, strict=True):
        assert torch.equal(idx.flatten(1), z.argmax(-1))


def test_unconditional_labels_use_the_null_class(models):
    labels = torch.full((4,), -1)
    _, indices, unc = draw(models, seed=4, labels=labels, guidance=0.0)
    _, indices_guided, _ = draw(models, seed=4, labels=labels, guidance=3.0)
    assert all(torch.equal(a, b) for a, b in zip(indices, indices_guided, strict=True))
    logits = teacher_forced(models, labels, indices, guidance=0.0)
    h = -(logits[2].softmax(-1) * logits[2].log_softmax(-1)).sum(-1)
    torch.testing.assert_close(unc["maps"]["entropy"][2].flatten(1), h, rtol=1e-4, atol=1e-5)


# -- stages -----------------------------------------------------------------

def save_models(models, root, with_ce: bool = True) -> None:
    """The test tokenizer (with its clusters) and, unless ``with_ce`` is false, the test
    transformer as the `ce` seed-0 checkpoint, where the stages look for them."""
    var, tok = models
    save_torch(dict(config=tok.config, state_dict=tok.state_dict(),
                    code_to_cluster=CODE_TO_CLUSTER, num_clusters=CLUSTERS),
               root / "models" / "tokenizer.pt")
    if with_ce:
        save_torch(dict(config=var.config(), state_dict=var.state_dict(), ema_state_dict=None,
                        variant={"loss": "ce"}, temperatures=None, step=1),
                   root / "models" / "var-ce-s0.pt")


@pytest.fixture
def project(tmp_path, monkeypatch, models):
    """A project folder with params.yaml, a tokenizer and a `ce` seed-0 checkpoint."""
    var, tok = models
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["device"] = "cpu"
    params["sample"].update(n_per_class=3, batch_size=4, grid_per_class=2, save_pngs=True,
                            guidance=1.5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    save_models(models, tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_sample_stage(project, models):
    from stages import sample as stage
    from up.core.params import load_params

    stage.run(load_params(), "ce", 0)
    out = project / "samples" / "ce-s0"
    saved = load_torch(out / "samples.pt")
    N = CLASSES * 3
    assert saved["labels"].tolist() == [c for c in range(CLASSES) for _ in range(3)]
    assert saved["images"].shape == (N, 1, 8, 8) and saved["images"].dtype == torch.uint8
    assert saved["seed"] == 0 and saved["config"]["guidance"] == 1.5
    unc = saved["uncertainty"]
    assert [tuple(m.shape) for m in unc["maps"]["semantic_entropy"]] == \
        [(N, p, p) for p in PATCH_NUMS]
    assert unc["per_scale"]["dispersion"].shape == (N, len(PATCH_NUMS))
    # batch b of 4 draws from its own stream (seed, b): the images of sampling by hand
    var, tok = models
    by_hand = [sample(var, tok, saved["labels"][s:s + 4], guidance=1.5,
                      guidance_schedule="linear", generator=batch_generator(0, b, "cpu"),
                      code_to_cluster=CODE_TO_CLUSTER, num_clusters=CLUSTERS)[0]
               for b, s in enumerate(range(0, N, 4))]
    assert torch.equal(torch.cat(by_hand), saved["images"])
    assert json.loads((out / "params.json").read_text())["n_per_class"] == 3
    assert len(list((out / "png").glob("*.png"))) == N
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 8 + 3 * 2, CLASSES * 8 + (CLASSES + 1) * 2)  # rows = classes
    assert Image.open(out / "uncertainty_map.png").size[0] > 100


def test_sample_stage_records_the_variants_kappa(project, models):
    """Dispersion is recorded with the variant's own kappa (up: 3.0 here), 1.0 otherwise."""
    from stages import sample as stage
    from up.core.params import load_params

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["variants"] = {"ce": {"loss": "ce"}, "up": {"loss": "up", "kappa": 3.0}}
    params["sample"].update(save_pngs=False)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    (project / "models" / "var-up-s0.pt").write_bytes(
        (project / "models" / "var-ce-s0.pt").read_bytes())  # the same network
    stage.run(load_params(), "ce", 0)
    stage.run(load_params(), "up", 0)
    ce, up = (load_torch(project / "samples" / f"{v}-s0" / "samples.pt") for v in ("ce", "up"))
    assert ce["config"]["kappa"] == 1.0 and up["config"]["kappa"] == 3.0
    assert torch.equal(ce["images"], up["images"])
    for a, b in zip(ce["uncertainty"]["maps"]["dispersion"], up["uncertainty"]["maps"]["dispersion"],
                    strict=True):  # sum p (1 - p) / (kappa + 1)
        torch.testing.assert_close(b, a * 2.0 / 4.0)
    assert set(up["uncertainty"]["image"]) == {"entropy", "dispersion", "semantic_entropy",
                                               "cond_entropy", "surprisal"}


def test_generate_command(project):
    from stages import generate
    from up.core.params import load_params

    out = project / "gen.png"
    generate.run(load_params(), checkpoint=project / "models" / "var-ce-s0.pt",
                 tokenizer=project / "models" / "tokenizer.pt", classes=[1, 3], n=3, seed=0,
                 guidance=2.0, top_k=0, top_p=0.9, temperature=1.0, out=out)
    assert Image.open(out).size == (3 * 8 + 4 * 2, 2 * 8 + 3 * 2)


def test_cache_bound_counts_the_tokens_each_path_processes():
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("bench_sampling", bench / "sampling.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
    # 1 + 5 + 14 + 30 + 66 + 130 = 246 tokens without the cache, 130 with it
    assert module.cache_bound([1, 2, 3, 4, 6, 8]) == 246 / 130
    assert round(module.cache_bound([1, 2, 3, 4, 5, 6, 8, 10, 13, 16]), 2) == 2.51

