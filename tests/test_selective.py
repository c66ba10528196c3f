"""Selective generation: within-class selection, risk-coverage, AURC, AUROC, Spearman
with bootstrap intervals, realism, density and coverage, on cases with a known answer."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from up.evaluation.selective import (
    aurc,
    density_coverage,
    realism_score,
    score_correlations,
    selective_statistics,
    stratified_curves,
    stratified_keep,
    stratified_random,
    within_class_auroc,
    within_class_spearman,
)


def stats_of(scores, classes, failed, loss, quality, repeats=200, seed=0):
    rows, curves = selective_statistics(
        {"s": torch.as_tensor(scores, dtype=torch.float64)}, torch.as_tensor(classes),
        torch.as_tensor(failed, dtype=torch.bool), {"r": torch.as_tensor(loss, dtype=torch.float64)},
        {"q": torch.as_tensor(quality, dtype=torch.float64)}, repeats=repeats, seed=seed)
    return rows[0], curves


def test_auroc_by_hand():
    # class 0: failed scores {0.35, 0.8} vs good {0.1, 0.4}: 3 of 4 pairs ordered
    # class 1: failed {1} vs good {2, 3}: 0 of 2; pooled over pairs: 3 / 6
    scores = [0.1, 0.4, 0.35, 0.8, 1.0, 2.0, 3.0]
    failed = [0, 0, 1, 1, 1, 0, 0]
    classes = [0, 0, 0, 0, 1, 1, 1]
    assert within_class_auroc(scores[:4], failed[:4], classes[:4]) == pytest.approx(0.75)
    assert within_class_auroc(scores, failed, classes) == pytest.approx(0.5)
    row, _ = stats_of(scores, classes, failed, failed, scores)
    assert row["auroc"] == pytest.approx(0.5)
    # a tie between a failed and a good image counts half; across classes never counts
    assert within_class_auroc([1.0, 1.0, 0.0], [1, 0, 0], [0, 0, 0]) == pytest.approx(0.75)
    row, _ = stats_of([1.0, 1.0, 0.0, 9.0, -9.0], [0, 0, 0, 1, 1], [1, 0, 0, 0, 1], [0] * 5,
                      [0, 1, 2, 3, 4])
    assert row["auroc"] == pytest.approx((1.5 + 0.0) / (2 + 1))


def test_aurc_by_hand():
    # ranked by score the losses are 0, 1, 0, 1: risks at k = 1..4 are 0, 1/2, 1/3, 1/2
    score, loss, classes = [0.1, 0.2, 0.3, 0.4], [0.0, 1.0, 0.0, 1.0], [0, 0, 0, 0]
    areas = aurc(score, loss, classes)
    assert areas["score"] == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    assert areas["random"] == pytest.approx(0.5)  # the expectation: the mean loss throughout
    assert areas["oracle"] == pytest.approx((0 + 0 + 1 / 3 + 1 / 2) / 4)
    # two classes of two: each keeps 1 then 2; class 1 ranked worst first
    areas = aurc([0, 1, 1, 0], [0.0, 2.0, 0.0, 4.0], [0, 0, 1, 1])
    assert areas["score"] == pytest.approx(((0 + 4) / 2 + 6 / 4) / 2)
    assert areas["oracle"] == pytest.approx(((0 + 0) / 2 + 6 / 4) / 2)
    row, curves = stats_of([0.1, 0.2, 0.3, 0.4], [0, 0, 0, 0], [0, 1, 0, 1], loss, [1, 2, 3, 4])
    assert row["aurc_r"] == pytest.approx(0.3333333333)
    assert row["aurc_gain_r"] == pytest.approx((0.5 - 1 / 3) / (0.5 - 5 / 24))
    assert [c["value"] for c in curves if c["score"] == "s"] == pytest.approx([0, 0.5, 1 / 3, 0.5])
    assert [c["coverage"] for c in curves if c["score"] == "s"] == [0.25, 0.5, 0.75, 1.0]


def test_spearman_by_hand():
    # class 0: d^2 = 0 + 1 + 1 + 0 -> 1 - 6 * 2 / (4 * 15) = 0.8; class 1: reversed, -1
    a = [1, 2, 3, 4, 1, 2, 3]
    b = [1, 3, 2, 4, 3, 2, 1]
    classes = [0, 0, 0, 0, 1, 1, 1]
    assert within_class_spearman(a[:4], b[:4], classes[:4]) == pytest.approx(0.8)
    assert within_class_spearman(a, b, classes) == pytest.approx((0.8 - 1) / 2)
    row, _ = stats_of(a, classes, [0] * 7, [0] * 7, b)
    assert row["spearman_q"] == pytest.approx(-0.1)
    # ties get average ranks, as in scipy
    x, y = [1.0, 1.0, 2.0, 3.0, 3.0], [5.0, 3.0, 3.0, 1.0, 2.0]
    row, _ = stats_of(x, [0] * 5, [0] * 5, [0] * 5, y)
    assert row["spearman_q"] == pytest.approx(spearmanr(x, y).statistic)


def test_point_estimates_equal_sklearn_and_scipy_and_intervals_hold_them():
    gen = torch.Generator().manual_seed(0)
    classes = torch.arange(4).repeat_interleave(30)
    score = torch.rand(120, generator=gen, dtype=torch.float64)
    quality = -score + 0.5 * torch.randn(120, generator=gen, dtype=torch.float64)
    failed = quality < -0.7
    row, _ = stats_of(score, classes, failed, -quality, quality, repeats=300, seed=3)
    assert row["auroc"] == pytest.approx(within_class_auroc(score, failed, classes))
    assert row["spearman_q"] == pytest.approx(within_class_spearman(score, quality, classes))
    for key in ("auroc", "spearman_q", "aurc_r", "aurc_gain_r"):
        assert row[f"{key}_lo"] < row[key] < row[f"{key}_hi"]
    assert row["auroc"] > 0.7 and row["spearman_q"] < -0.3 and row["aurc_gain_r"] > 0.3
    again, _ = stats_of(score, classes, failed, -quality, quality, repeats=300, seed=3)
    assert again == row
    other, _ = stats_of(score, classes, failed, -quality, quality, repeats=300, seed=4)
    assert other["auroc_lo"] != row["auroc_lo"] and other["auroc"] == row["auroc"]


def test_oracle_is_never_above_random_nor_any_score():
    gen = torch.Generator().manual_seed(1)
    classes = torch.cat([torch.full((n,), c) for c, n in enumerate((13, 20, 7))])
    loss = torch.rand(40, generator=gen, dtype=torch.float64) ** 3
    scores = {f"s{i}": torch.rand(40, generator=gen, dtype=torch.float64) for i in range(5)}
    _, curves = selective_statistics(scores, classes, loss > 0.5, {"r": loss}, {}, 10, 0)
    by = {}
    for c in curves:
        by.setdefault(c["score"], []).append(c["value"])
    assert len(by["oracle"]) == 20  # coverages m / 20, m = 1..20
    for name, values in by.items():
        assert all(o <= v + 1e-12 for o, v in zip(by["oracle"], values, strict=True)), name
    assert by["random"][-1] == pytest.approx(by["s0"][-1])  # full coverage: the same set


def test_stratified_selection_keeps_every_class_fraction_exactly():
    gen = torch.Generator().manual_seed(2)
    classes = torch.cat([torch.full((n,), c) for c, n in enumerate((10, 20, 40))])
    classes = classes[torch.randperm(70, generator=gen)]
    scores = torch.rand(70, generator=gen)
    for fraction in (1.0, 0.5, 0.1):
        for kept in (stratified_keep(scores, classes, fraction),
                     stratified_random(classes, fraction, gen)):
            counts = torch.bincount(classes[kept], minlength=3).tolist()
            assert counts == [round(fraction * n) for n in (10, 20, 40)]
            assert len(set(kept.tolist())) == len(kept)
    kept = stratified_keep(scores, classes, 0.5)
    for c in range(3):  # the lowest scores of each class
        members = scores[classes == c]
        assert sorted(scores[kept][classes[kept] == c].tolist()) == \
            sorted(members.sort().values[:len(members) // 2].tolist())
    rows = stratified_curves({"s": scores}, classes, [1.0, 0.5], lambda k: {"n": len(k)}, 3, 0)
    assert [(r["score"], r["fraction"], r["n"]) for r in rows] == \
        [("s", 1.0, 70), ("s", 0.5, 35), ("random", 1.0, 70), ("random", 0.5, 35)]


def test_score_correlations_matrix():
    classes = torch.tensor([0, 0, 0, 1, 1, 1])
    a = torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    out = score_correlations({"a": a, "b": -a, "c": a ** 3}, classes)
    assert out["scores"] == ["a", "b", "c"]
    np.testing.assert_allclose(out["spearman"], [[1, -1, 1], [-1, 1, -1], [1, -1, 1]])


def test_realism_by_hand():
    # class 0 real points 0, 1, 3 (k = 1: radii 1, 1, 2); class 1 real points far away
    real = torch.tensor([[0.0], [1.0], [3.0], [100.0], [101.0]])
    real_classes = torch.tensor([0, 0, 0, 1, 1])
    gen = torch.tensor([[0.5], [10.0], [0.5]])
    out = realism_score(gen, torch.tensor([0, 0, 1]), real, real_classes, k=1)
    assert out[0].item() == pytest.approx(2.0)  # max(1 / 0.5, 1 / 0.5, 2 / 2.5)
    assert out[1].item() == pytest.approx(2 / 7)  # max(1 / 10, 1 / 9, 2 / 7)
    assert out[2].item() == pytest.approx(1 / 99.5)  # judged against its own class only


def test_density_and_coverage_by_hand():
    # real 0, 1, 2, 10 with k = 1: radii 1, 1, 1, 8
    real = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    gen = torch.tensor([[0.5], [5.0], [100.0]])
    # 0.5 lies in the balls of 0 and 1; 5 in the ball of 10; 100 in none
    out = density_coverage(gen, real, k=1)
    assert out["density"] == pytest.approx((2 + 1 + 0) / (1 * 3))
    assert out["coverage"] == pytest.approx(3 / 4)  # the ball of 2 holds no sample
    out = density_coverage(real, real, k=1)
    assert out["coverage"] == 1.0 and out["density"] > 1  # duplicates crowd the balls
    assert math.isclose(density_coverage(gen[2:], real, k=1)["coverage"], 0.0)
