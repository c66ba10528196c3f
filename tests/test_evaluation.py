"""The evaluator, torch-fidelity metrics (evaluator and offline Inception paths),
diversity and the selective-generation bookkeeping."""

import math
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from up.data.sources import load_digits
from up.evaluation.evaluator import (
    accuracy,
    evaluator_outputs,
    load_evaluator,
    save_evaluator,
    train_evaluator,
)
from up.evaluation.extractor import EVALUATOR_EXTRACTOR, EvaluatorFeatureExtractor, register_evaluator
from up.evaluation.fidelity import (
    INCEPTION_EXTRACTOR,
    FidelityConfig,
    SubsetQuality,
    compute_quality,
    extract_features,
    frechet_distance,
    frechet_distance_to_stats,
    load_reference_stats,
)
from up.evaluation.selective import (
    class_accuracy,
    class_diversity,
    kept_count,
    most_certain,
    on_class_diversity,
    realism_score,
)

TRAIN_ARGS = dict(widths=[8, 16], feature_dim=16, feature_scale=0.4, batch_size=64, lr=3e-3,
                  warmup_steps=50, eval_batch_size=256)


@pytest.fixture(scope="module")
def digits():
    """sklearn's 8x8 digits, shuffled (the file is ordered by writer), cut into an
    evaluator training set and two disjoint held-out sets of the same distribution."""
    raw = load_digits()
    images, labels = torch.stack(raw.items), raw.labels
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
    parts = perm[:897], perm[897:1347], perm[1347:]
    return [(images[p], labels[p]) for p in parts]


@pytest.fixture(scope="module")
def evaluator_path(digits, tmp_path_factory):
    (images, labels), _, _ = digits
    torch.set_num_threads(1)
    model = train_evaluator(images, labels, 10, steps=300, seed=0, show_progress=False,
                            **TRAIN_ARGS)
    path = tmp_path_factory.mktemp("evaluator") / "evaluator.pt"
    save_evaluator(model, path)
    return path


@pytest.fixture
def config(evaluator_path):
    return FidelityConfig(extractor="evaluator", weights_path=str(evaluator_path), seed=0)


def test_evaluator_classifies_and_has_inception_like_feature_scale(digits, evaluator_path):
    (train_x, _), (held_x, held_y), _ = digits
    model = load_evaluator(evaluator_path)
    assert accuracy(model, held_x, held_y, 256) > 0.8
    features, logits = evaluator_outputs(model, train_x, 256)
    assert features.shape == (len(train_x), 16) and logits.shape == (len(train_x), 10)
    assert features.pow(2).mean().sqrt().item() == pytest.approx(0.4, rel=1e-4)


def test_evaluator_training_is_a_function_of_the_seed(digits):
    (images, labels), _, _ = digits
    runs = [train_evaluator(images, labels, 10, steps=5, seed=s, show_progress=False, **TRAIN_ARGS)
            for s in (3, 3, 4)]
    same = [torch.equal(a, b) for a, b in zip(runs[0].state_dict().values(),
                                              runs[1].state_dict().values(), strict=True)]
    assert all(same)
    assert runs[0].feature_multiplier == runs[1].feature_multiplier
    assert not torch.equal(runs[0].head.weight, runs[2].head.weight)


def test_registration_is_idempotent_and_a_second_raw_registration_raises():
    register_evaluator()
    register_evaluator()
    assert FEATURE_EXTRACTORS_REGISTRY[EVALUATOR_EXTRACTOR] is EvaluatorFeatureExtractor
    with pytest.raises(Exception, match="already registered"):
        register_feature_extractor(EVALUATOR_EXTRACTOR, EvaluatorFeatureExtractor)


def test_fid_of_a_set_against_itself_is_zero(digits, config):
    _, (real, _), _ = digits
    q = compute_quality(real, real, config)
    assert abs(q["fid"]) < 1e-6
    assert q["precision"] == 1.0 and q["recall"] == 1.0
    assert abs(q["kid_mean"]) < 2e-3
    assert 1.0 < q["is_mean"] <= 10.0  # IS is at most the number of classes


def test_half_of_the_classes_has_lower_recall_and_higher_fid(digits, config):
    _, (real, _), (other, other_labels) = digits
    half = other[other_labels < 5][:200]
    fresh = other[torch.randperm(len(other), generator=torch.Generator().manual_seed(0))[:200]]
    q_fresh, q_half = compute_quality(fresh, real, config), compute_quality(half, real, config)
    assert q_half["recall"] < q_fresh["recall"] - 0.15
    assert q_half["fid"] > 3 * q_fresh["fid"]
    assert q_half["kid_mean"] > q_fresh["kid_mean"]
    assert q_half["is_mean"] < q_fresh["is_mean"]  # five classes instead of ten


def test_small_sets_clamp_kid_subsets_and_is_splits(digits, config):
    _, (real, _), (other, _) = digits
    q = compute_quality(other[:6], real[:40], config)  # kid_subset_size 200 > 6, IS splits 10 > 6
    assert all(math.isfinite(v) for v in q.values())


def test_subset_metrics_reproduce_calculate_metrics_on_the_full_set(digits, config):
    _, (real, _), (other, _) = digits
    q = compute_quality(other, real, config)
    scorer = SubsetQuality(extract_features(real, config), config)
    sub = scorer(extract_features(other, config))
    # torch-fidelity takes the means in float32: agreement to ~1e-8 of the traces (~2.5)
    assert sub["fid"] == pytest.approx(q["fid"], abs=1e-7)
    assert sub["precision"] == q["precision"] and sub["recall"] == q["recall"]


@pytest.mark.parametrize("n_x, n_y, dim", [(40, 30, 5), (6, 9, 20)])  # both branches
def test_frechet_distance_equals_torch_fidelity_formula(n_x, n_y, dim):
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(n_x, dim, generator=gen, dtype=torch.float64)
    y = 0.5 * torch.randn(n_y, dim, generator=gen, dtype=torch.float64) + 0.3
    expected = fid_statistics_to_metric(fid_features_to_statistics(x),
                                        fid_features_to_statistics(y), False)
    assert frechet_distance(x, y) == pytest.approx(expected["frechet_inception_distance"],
                                                   rel=1e-8)
    assert abs(frechet_distance(x, x)) < 1e-9


class _RandomInception(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception with its layers but no weights loaded: the state dict
    of the right shape that a test can build offline."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return super().load_state_dict(state_dict, strict=False)


def random_inception_weights(path, images: torch.Tensor) -> None:
    """Kaiming-initialised convs, BatchNorm statistics from one train-mode pass on
    ``images``, saved like torch-fidelity's converted weights."""
    empty = path.with_name("empty.pt")
    torch.save({}, empty)
    net = _RandomInception(INCEPTION_EXTRACTOR, ["2048", "logits_unbiased"],
                           feature_extractor_weights_path=str(empty))
    gen = torch.Generator().manual_seed(0)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=gen)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # running stats = this pass's batch statistics
    net.train()
    with torch.no_grad():
        net(images.expand(-1, 3, -1, -1).contiguous())
    torch.save(net.state_dict(), path)


@pytest.fixture(scope="module")
def inception_weights(digits, tmp_path_factory):
    (train_x, _), _, _ = digits
    path = tmp_path_factory.mktemp("inception") / "inception.pt"
    torch.set_num_threads(1)
    random_inception_weights(path, train_x[:4])
    return path


def test_inception_features_load_a_local_weights_file_and_fid_sees_collapse(digits,
                                                                            inception_weights):
    _, (real, _), (other, _) = digits
    config = FidelityConfig(extractor=INCEPTION_EXTRACTOR, weights_path=str(inception_weights))
    real_f, fresh_f = extract_features(real[:8], config), extract_features(other[:8], config)
    collapsed_f = extract_features(other[8:9].expand(8, -1, -1, -1), config)
    assert real_f.shape == (8, 2048)  # grayscale digits went in as RGB
    scorer = SubsetQuality(real_f, config)
    fresh, collapsed = scorer(fresh_f), scorer(collapsed_f)
    assert math.isfinite(fresh["fid"]) and fresh["fid"] > 0
    assert collapsed["fid"] > 1.3 * fresh["fid"]
    assert collapsed["recall"] < fresh["recall"]


@pytest.mark.slow  # torch-fidelity's FID of 2048-d features: tens of seconds on 1 thread
def test_inception_path_through_calculate_metrics(digits, inception_weights):
    _, (real, _), (other, _) = digits
    config = FidelityConfig(extractor=INCEPTION_EXTRACTOR, weights_path=str(inception_weights))
    q = compute_quality(other[:8], real[:8], config)
    assert all(math.isfinite(v) for v in q.values())
    features = [extract_features(x, config) for x in (other[:8], real[:8])]
    assert q["fid"] == pytest.approx(frechet_distance(*features), rel=1e-5)


def test_most_certain_keeps_the_lowest_scores():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])
    assert most_certain(scores, 1.0).tolist() == [1, 3, 6, 4, 8, 0, 9, 5, 7, 2]  # ties: index
    assert most_certain(scores, 0.5).tolist() == [1, 3, 6, 4, 8]
    assert most_certain(scores, 0.25).tolist() == [1, 3]  # round(2.5) = 2
    assert [kept_count(10, f) for f in (1.0, 0.9, 0.75, 0.5, 0.01)] == [10, 9, 8, 5, 1]
    with pytest.raises(ValueError):
        kept_count(10, 0.0)


def test_class_diversity_and_accuracy_by_hand():
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0],  # class 0: one distance, 5
                             [0.0, 0.0], [1.0, 0.0], [0.0, 1.0],  # class 1: 1, 1, sqrt(2)
                             [9.0, 9.0]])  # class 2: a single image, ignored
    classes = torch.tensor([0, 0, 1, 1, 1, 2])
    expected = (5.0 + (2 + math.sqrt(2)) / 3) / 2
    assert class_diversity(features, classes) == pytest.approx(expected)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert class_accuracy(logits, torch.tensor([0, 0, -1, 1])) == pytest.approx(2 / 3)
    assert class_accuracy(logits, torch.full((4,), -1)) is None


# -- per-sample quality and the evaluate stage ---------------------------------------

def test_realism_of_real_images_is_high_and_of_noise_low(digits, evaluator_path):
    (_, _), (real_x, real_y), (held_x, held_y) = digits
    model = load_evaluator(evaluator_path)
    real_f, _ = evaluator_outputs(model, real_x, 256)
    held_f, _ = evaluator_outputs(model, held_x, 256)
    noise = torch.randint(0, 256, held_x.shape, generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    noise_f, _ = evaluator_outputs(model, noise, 256)
    real_score = realism_score(held_f, held_y, real_f, real_y, k=3)
    noise_score = realism_score(noise_f, held_y, real_f, real_y, k=3)
    assert real_score.median() > 1.0 and (real_score >= 1).double().mean() > 0.8
    # (a tiny evaluator with 16 features: noise is not far from every digit)
    assert noise_score.median() < 0.8 and (noise_score >= 1).double().mean() < 0.2
    # against another class's set, real images look unreal
    wrong = realism_score(held_f, (held_y + 1) % 10, real_f, real_y, k=3)
    assert wrong.median() < real_score.median() / 2
    own = realism_score(real_f[:20], real_y[:20], real_f, real_y, k=3)  # members of the set
    assert (own > 1e6).all()


def test_on_class_diversity_ignores_misclassified_samples():
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0], [30.0, 40.0]])
    classes = torch.tensor([0, 0, 0])
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # the far one is a wrong digit
    assert on_class_diversity(features, logits, classes) == pytest.approx(5.0)
    assert class_diversity(features, classes) > 5.0
    assert on_class_diversity(features, -logits, classes) is None


def test_evaluate_stage_writes_selective_figures(digits, evaluator_path, tmp_path, monkeypatch):
    """The evaluate stage end to end on digits 'samples' (real digits, a fifth of them
    replaced by noise, with an uncertainty that is high on the noise), calibration
    stubbed: the scores that see the noise find the failed samples, at the tails too;
    the label (realism against the evaluator's training digits) agrees with itself."""
    import json
    import time

    import yaml

    from stages import evaluate as stage
    from tests.project import ROOT, save_prepared
    from up.core.io import save_torch
    from up.core.params import load_params
    from up.evaluation.metrics import summary_keys
    from up.evaluation.report import METRICS

    (train_x, train_y), (real_x, real_y), (held_x, held_y) = digits
    order = torch.argsort(held_y, stable=True)
    per_class = torch.bincount(held_y).min().item()
    keep = torch.cat([order[held_y[order] == c][:per_class] for c in range(10)])
    images, labels = held_x[keep].clone(), held_y[keep].clone()
    gen = torch.Generator().manual_seed(0)
    noisy = torch.rand(len(images), generator=gen) < 0.2
    images[noisy] = torch.randint(0, 256, (int(noisy.sum()), *images.shape[1:]), generator=gen,
                                  dtype=torch.uint8)
    signal = noisy.float() + 0.3 * torch.rand(len(images), generator=gen)
    noise_only = torch.rand(len(images), generator=gen)
    maps = {m: [(signal if m != "surprisal" else noise_only)[:, None, None]
                * torch.ones(len(images), p, p) for p in (1, 2, 4)]
            for m in ("entropy", "dispersion", "semantic_entropy", "cond_entropy", "surprisal")}
    save_torch({"images": images, "labels": labels, "seed": 0,
                "uncertainty": {"maps": maps}}, tmp_path / "samples/ce-s0/samples.pt")
    save_prepared(tmp_path / "data/prepared", {"train": (train_x, train_y), "test": (real_x, real_y)},
                  [str(c) for c in range(10)])
    (tmp_path / "models").mkdir()
    (tmp_path / "models/evaluator.pt").write_bytes(evaluator_path.read_bytes())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["device"] = "cpu"
    params["evaluate"].update(bootstrap=200, kid_subsets=5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stage, "calibration", lambda *a: ({"ece": 0.0, "n_val_tokens": 1}, [
        {"bin": 0, "confidence": 0.5, "accuracy": 0.5, "count": 1}]))
    start = time.perf_counter()
    stage.run(load_params(), "ce", 0)
    elapsed = time.perf_counter() - start

    metrics = json.loads((tmp_path / "metrics/eval-ce-s0.json").read_text())
    # every figure the report shows is in the file (calibration is stubbed above)
    assert set(summary_keys(METRICS)) - set(metrics) == {"nll", "brier", "token_accuracy"}
    for key in ("density", "coverage", "diversity", "diversity_all", "failure_rate",
                "aurc_random", "aurc_oracle", "selective_fid_oracle", "selective_fid_random"):
        assert metrics[key] is not None, key
    assert metrics["failure_rate"] >= noisy.double().mean().item() - 0.02
    assert metrics["auroc_entropy"] > 0.8 and metrics["auroc_entropy_lo"] > 0.7
    assert 0.3 < metrics["auroc_surprisal"] < 0.7  # the unrelated score: chance
    assert metrics["aurc_gain_entropy_lo"] > 0.5 and metrics["aurc_gain_surprisal_lo"] < 0.0
    assert metrics["spearman_entropy"] < -0.3
    assert metrics["aurc_oracle"] <= metrics["aurc_entropy"] <= metrics["aurc_random"]
    assert metrics["selective_fid_entropy"] < metrics["selective_fid_random"]
    # the noise is (nearly all of) the failures: the least certain 10 % by entropy fail,
    # the most certain 10 % hardly; the score that ignores the noise sits at the base rate
    base = metrics["failure_rate"]
    assert metrics["failure_rate_lo"] < base < metrics["failure_rate_hi"]
    assert metrics["failure_uncertain10_entropy"] > 0.85
    assert metrics["failure_certain10_entropy"] < base < metrics["failure_uncertain10_entropy_lo"]
    assert metrics["failure_uncertain10_surprisal_lo"] < base
    assert metrics["failure_misclassified"] <= base and metrics["failure_unreal"] <= base
    assert metrics["label_agreement"] > 0.9 and metrics["label_kappa"] > 0.7
    assert metrics["n_real_train"] == len(train_y)
    for k in (1, 2, 3):  # the signal is at every scale (scales 1, 2, 4: coarse 1, fine 2, 3)
        assert metrics[f"auroc_entropy_scale{k}"] > 0.8, k
        assert metrics[f"auroc_entropy_scale{k}_lo"] < metrics[f"auroc_entropy_scale{k}"]
    assert metrics["auroc_entropy_coarse"] == pytest.approx(metrics["auroc_entropy_scale1"])
    plots = tmp_path / "plots/eval/ce-s0"
    for name in ("selective", "risk_coverage", "score_correlation"):
        assert (plots / f"{name}.png").stat().st_size > 0
    per_sample = json.loads((plots / "per_sample.json").read_text())
    assert len(per_sample) == len(images)
    assert sum(r["failed"] for r in per_sample) / len(images) == \
        pytest.approx(metrics["failure_rate"])
    stats = json.loads((plots / "selective_stats.json").read_text())
    assert {r["score"] for r in stats} == {f"{m}{e}" for m in maps
                                           for e in ("", "_coarse", "_fine")}
    corr = json.loads((plots / "score_correlation.json").read_text())
    assert len(corr) == 15 ** 2  # 5 measures x (all tokens, coarse, fine), every pair
    print(f"evaluate stage: {elapsed:.1f} s")


def _adm_reference_batch(path, images: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> None:
    """An .npz laid out as the ADM evaluation suite's reference batches
    (guided-diffusion's VIRTUAL_imagenet256_labeled.npz): arr_0 the uint8 images (N, H, W, 3),
    mu and sigma their Inception pool statistics."""
    np.savez(path, arr_0=images, mu=mu, sigma=sigma)


def test_fid_against_an_adm_reference_batch_by_hand(tmp_path):
    """evaluate.reference_stats takes the ADM suite's .npz as it is: mu and sigma are read,
    the images (arr_0) ignored and never read; the FID equals the formula computed by hand
    (scipy's matrix square root)."""
    from scipy import linalg

    dim, rng = 12, np.random.default_rng(0)
    real = rng.normal(size=(50, dim)) @ rng.normal(size=(dim, dim)) + 0.5
    mu, sigma = real.mean(0), np.cov(real, rowvar=False)
    gen = torch.from_numpy(rng.normal(size=(40, dim)) * 1.3)
    images = rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    _adm_reference_batch(tmp_path / "VIRTUAL_tiny_labeled.npz", images, mu, sigma)
    with np.load(tmp_path / "VIRTUAL_tiny_labeled.npz") as npz:
        assert sorted(npz.files) == ["arr_0", "mu", "sigma"]

    # the same archive with arr_0 an .npy whose header no reader can parse: must never be read
    unread = tmp_path / "unread.npz"
    broken = b"\x93NUMPY\x01\x00\x10\x00{'descr': broken"
    with zipfile.ZipFile(tmp_path / "VIRTUAL_tiny_labeled.npz") as src, \
            zipfile.ZipFile(unread, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, broken if name == "arr_0.npy" else src.read(name))
    with np.load(unread) as npz, pytest.raises(Exception):  # noqa: B017 - any parse error
        npz["arr_0"]

    g = gen.numpy()
    mu_g, sigma_g = g.mean(0), np.cov(g, rowvar=False)
    covmean = linalg.sqrtm(sigma_g @ sigma).real
    by_hand = float(((mu_g - mu) ** 2).sum() + np.trace(sigma_g) + np.trace(sigma)
                    - 2 * np.trace(covmean))
    assert by_hand > 1
    for path in (tmp_path / "VIRTUAL_tiny_labeled.npz", unread):
        loaded_mu, loaded_sigma = load_reference_stats(path, dim)
        assert np.array_equal(loaded_mu.numpy(), mu) and np.array_equal(loaded_sigma.numpy(), sigma)
        assert frechet_distance_to_stats(gen, loaded_mu, loaded_sigma) == \
            pytest.approx(by_hand, rel=1e-9)
