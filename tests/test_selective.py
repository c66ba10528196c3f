"""Selective generation: within-class selection, risk-coverage, AURC, AUROC, Spearman
with bootstrap intervals, realism, density and coverage, on cases with a known answer."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from up.evaluation.figures import risk_coverage_figure
from up.evaluation.selective import (
    aurc,
    density_coverage,
    failure_label,
    label_agreement,
    label_reliability,
    per_class_subset,
    realism_score,
    scale_auroc,
    score_correlations,
    selective_figures,
    selective_statistics,
    split_halves,
    stratified_curves,
    stratified_keep,
    stratified_random,
    within_class_auroc,
    within_class_spearman,
)
from up.generation.scores import IMAGE_SCORES, group_mean, image_scores, scale_groups


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


# -- the failure label and its reliability ---------------------------------------

def test_failure_label_is_misclassified_or_unreal():
    predicted, classes = torch.tensor([0, 1, 0, 0]), torch.tensor([0, 0, 0, 0])
    realism = torch.tensor([2.0, 2.0, 0.5, 1.0])
    assert failure_label(predicted, classes, realism, 1.0).tolist() == [False, True, True, False]


def test_label_agreement_and_kappa_by_hand():
    from sklearn.metrics import cohen_kappa_score

    a = torch.tensor([0, 1, 1, 1], dtype=torch.bool)
    b = torch.tensor([0, 0, 1, 1], dtype=torch.bool)
    # agreement 3/4; chance 3/4 * 1/2 + 1/4 * 1/2 = 1/2; kappa (3/4 - 1/2) / (1 - 1/2)
    assert label_agreement(a, b) == {"agreement": 0.75, "kappa": 0.5, "n": 4}
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(50, generator=gen) < 0.3, torch.rand(50, generator=gen) < 0.6
    assert label_agreement(x, y)["kappa"] == pytest.approx(cohen_kappa_score(x, y))
    assert label_agreement(a, a)["kappa"] == 1.0
    assert label_agreement(a, ~a) == {"agreement": 0.0, "kappa": pytest.approx(-0.6), "n": 4}
    assert label_agreement(a[:1], a[:1])["kappa"] is None  # both constant: chance is 1
    with pytest.raises(ValueError, match="same samples"):
        label_agreement(a, b[:3])


def test_split_halves_and_per_class_subset():
    classes = torch.tensor([0] * 7 + [1] * 4 + [2] * 10)
    first, second = split_halves(classes, seed=3)
    assert torch.bincount(classes[first]).tolist() == [3, 2, 5]
    assert torch.bincount(classes[second]).tolist() == [4, 2, 5]
    assert sorted(first.tolist() + second.tolist()) == list(range(21))
    assert torch.equal(split_halves(classes, 3)[0], first)
    assert not torch.equal(split_halves(classes, 4)[0], first)
    kept = per_class_subset(classes, 5, seed=0)
    assert torch.bincount(classes[kept]).tolist() == [5, 4, 5]
    assert torch.equal(kept, kept.sort().values) and len(set(kept.tolist())) == len(kept)
    assert torch.equal(per_class_subset(classes, 0, seed=0), torch.arange(21))


def test_label_reliability_on_a_constructed_case():
    """Class 0's real images: one half at 0 and 1 (k = 1: radii 1), the other at 1 and 3
    (radii 2). Samples at 0.5 (good against both), 4 (fails against the first half
    only), -3 (fails against both) and 0.5 misclassified (fails against both): labels
    [0, 1, 1, 1] and [0, 0, 1, 1], agreement 3/4, kappa 1/2."""
    real_classes = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    first, second = split_halves(real_classes, seed=7)
    real = torch.zeros(8, 1)
    real[first[real_classes[first] == 0], 0] = torch.tensor([0.0, 1.0])
    real[second[real_classes[second] == 0], 0] = torch.tensor([1.0, 3.0])
    real[real_classes == 1, 0] = torch.tensor([100.0, 101.0, 102.0, 103.0])
    gen = torch.tensor([[0.5], [4.0], [-3.0], [0.5]])
    gen_classes, predicted = torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 0, 1])
    out = label_reliability(gen, predicted, gen_classes, real, real_classes, k=1, threshold=1.0,
                            seed=7)
    assert out == {"agreement": 0.75, "kappa": pytest.approx(0.5), "n": 4}
    # against the whole class (0, 1, 1, 3: radii 1, 0, 0, 2) the sample at 4 is real
    whole = realism_score(gen, gen_classes, real, real_classes, k=1)
    assert whole.tolist() == pytest.approx([2.0, 2.0, 1 / 3, 2.0])


# -- per-scale-group scores and per-scale AUROC -------------------------------------

def test_scale_groups_halves_by_hand():
    assert scale_groups(3) == {"coarse": range(0, 1), "fine": range(1, 3)}
    assert scale_groups(6) == {"coarse": range(0, 3), "fine": range(3, 6)}
    with pytest.raises(ValueError, match="at least 2 scales"):
        scale_groups(1)
    # 3 scales (sides 1, 2, 2): coarse = the 1x1 scale, fine = the 8 tokens of the others
    maps3 = {"h": [torch.tensor([[[1.0]], [[3.0]]]),
                   torch.tensor([[[2.0, 2.0], [2.0, 2.0]], [[0.0, 0.0], [0.0, 5.0]]]),
                   torch.tensor([[[4.0, 4.0], [4.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]])]}
    scores = image_scores(maps3)
    assert list(scores) == ["h", "h_coarse", "h_fine"]
    torch.testing.assert_close(scores["h"], torch.tensor([25.0 / 9, 12.0 / 9]))
    torch.testing.assert_close(scores["h_coarse"], torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(scores["h_fine"], torch.tensor([3.0, 9.0 / 8]))
    # 6 scales of sides 1..6, every token of scale k equal to k: coarse (1 + 8 + 27) / 14,
    # fine (64 + 125 + 216) / 77, each token counted once
    maps6 = {"h": [torch.full((1, p, p), float(p)) for p in range(1, 7)]}
    scores = image_scores(maps6)
    torch.testing.assert_close(scores["h_coarse"], torch.tensor([36.0 / 14]))
    torch.testing.assert_close(scores["h_fine"], torch.tensor([405.0 / 77]))
    torch.testing.assert_close(group_mean(maps6["h"], range(6)), scores["h"])
    assert IMAGE_SCORES[:5] == ["entropy", "dispersion", "semantic_entropy", "cond_entropy",
                                "surprisal"]
    assert IMAGE_SCORES[5:] == [f"{m}_{g}" for g in ("coarse", "fine") for m in IMAGE_SCORES[:5]]


def test_scale_auroc_by_hand():
    # 2 scales; scale 1 ranks the failures first (AUROC 1), scale 2 last (AUROC 0)
    failed = torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool)
    classes = torch.tensor([0, 0, 0, 1, 1, 1])
    s1 = torch.tensor([3.0, 1.0, 2.0, 9.0, 7.0, 8.0])
    maps = {"h": [s1[:, None, None], -s1[:, None, None].expand(6, 2, 2)]}
    out = scale_auroc(maps, classes, failed, repeats=50, seed=0)
    assert set(out) == {f"auroc_h_scale{k}{e}" for k in (1, 2) for e in ("", "_lo", "_hi")}
    assert out["auroc_h_scale1"] == 1.0 and out["auroc_h_scale2"] == 0.0
    assert out["auroc_h_scale1_lo"] <= 1.0 <= out["auroc_h_scale1_hi"]


# -- risk at the extremes ----------------------------------------------------------

def _tails(score, classes, failed, repeats=200):
    rows, _ = selective_statistics({"s": score, "reversed": -score}, classes, failed,
                                   {"failure": failed.double()}, {"log_p": -score},
                                   repeats=repeats, seed=0)
    return {r["score"]: r for r in rows}


def test_risk_at_the_extremes_by_hand():
    """Two classes of 20 (5 %: 1 image per class, 10 %: 2). The score ranks images by
    index within each class; class 0 fails at its highest score and at its 6th lowest,
    class 1 at its two highest scores."""
    classes = torch.arange(2).repeat_interleave(20)
    score = torch.cat([torch.arange(20.0), torch.arange(20.0)])
    failed = torch.zeros(40, dtype=torch.bool)
    failed[[19, 5, 38, 39]] = True
    rows = _tails(score, classes, failed)
    s, rev = rows["s"], rows["reversed"]
    assert s["failure_rate"] == rev["failure_rate"] == pytest.approx(4 / 40)
    assert s["failure_uncertain5"] == 1.0 and s["failure_uncertain10"] == pytest.approx(3 / 4)
    assert s["failure_certain5"] == 0.0 and s["failure_certain10"] == 0.0
    # the reversed signal: the most certain images are the failed ones
    assert rev["failure_certain5"] == 1.0 and rev["failure_certain10"] == pytest.approx(3 / 4)
    assert rev["failure_uncertain5"] == 0.0 and rev["failure_uncertain10"] == 0.0
    for key in ("failure_rate", "failure_uncertain10", "failure_certain10"):
        assert s[f"{key}_lo"] <= s[key] <= s[f"{key}_hi"], key
    assert s["failure_rate_lo"] < 0.1 < s["failure_rate_hi"]


def test_a_perfect_score_fails_all_of_its_least_certain_tail():
    gen = torch.Generator().manual_seed(5)
    classes = torch.arange(4).repeat_interleave(50)
    score = torch.rand(200, generator=gen, dtype=torch.float64)
    # in every class the 10 % highest scores (5 images) fail, and 3 more at random
    failed = torch.zeros(200, dtype=torch.bool)
    for c in range(4):
        where = torch.nonzero(classes == c).flatten()
        order = where[torch.argsort(score[where])]
        failed[order[-5:]] = True
        failed[order[10 + torch.randperm(35, generator=gen)[:3]]] = True
    rows = _tails(score, classes, failed)
    s, rev = rows["s"], rows["reversed"]
    assert s["failure_rate"] == pytest.approx(32 / 200)
    assert s["failure_uncertain10"] == s["failure_uncertain5"] == 1.0
    assert s["failure_certain10"] == s["failure_certain5"] == 0.0
    assert rev["failure_certain10"] == 1.0 and rev["failure_uncertain10"] == 0.0
    assert s["failure_uncertain10_lo"] > s["failure_rate_hi"]  # the tail is clearly worse
    figures = selective_figures([], [s, rev], 0.5)
    assert figures["failure_uncertain10_s"] == 1.0
    assert figures["failure_rate_lo"] == s["failure_rate_lo"]
    assert figures["failure_certain5_s_hi"] == s["failure_certain5_hi"]
    assert figures["failure_certain10_reversed"] == 1.0


# -- the risk-coverage figure ----------------------------------------------------

def test_risk_coverage_panel_titles_clear_the_axis_labels_above():
    rows = [{"score": name, "risk": "failure", "coverage": c, "value": v}
            for name in [*IMAGE_SCORES, "random", "oracle"] for c, v in ((0.5, 0.2), (1.0, 0.3))]
    fig = risk_coverage_figure({"ce-s0": rows, "up-s0": rows})
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = np.array(fig.axes).reshape(-1, 5)
    assert axes.shape[0] == 3  # 15 scores, 5 a row
    for above, below in zip(axes[:-1], axes[1:], strict=True):
        for top, bottom in zip(above, below, strict=True):
            label = top.xaxis.label.get_window_extent(renderer)
            title = bottom.title.get_window_extent(renderer)
            assert title.y1 < label.y0, (bottom.get_title(), title, label)
