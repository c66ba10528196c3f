"""Comparing at equal quality: matched-quality interpolation, a guidance toy, the cached stages."""

import json
import math

import numpy as np
import pytest
import torch
import yaml

from tests.project import TINY, copy_project, run
from up.evaluation.fidelity import FidelityConfig, SubsetQuality
from up.evaluation.frontier import GRID as LEVELS
from up.evaluation.frontier import (
    common_range,
    curve,
    markdown,
    match_level,
    monotone_increasing,
    summarize,
    value_at,
)
from up.generation.sampler import sample

# -- the maths, by hand -----------------------------------------------------------


def test_monotone_fit_pools_adjacent_violators():
    assert monotone_increasing([0.2, 0.4, 0.8]).tolist() == [0.2, 0.4, 0.8]
    assert np.allclose(monotone_increasing([0.2, 0.5, 0.4, 0.8]), [0.2, 0.45, 0.45, 0.8])
    assert np.allclose(monotone_increasing([0.9, 0.6, 0.3]), [0.6, 0.6, 0.6])


def test_value_at_matched_quality_by_hand():
    q, r = np.array([0.2, 0.4, 0.8]), np.array([0.6, 0.5, 0.1])
    assert value_at(q, r, 0.6) == pytest.approx(0.3)  # halfway from (0.4, 0.5) to (0.8, 0.1)
    assert value_at(q, r, 0.3) == pytest.approx(0.55)
    assert value_at(q, r, 0.4) == pytest.approx(0.5)  # on a point
    assert value_at(q, r, 0.2) == pytest.approx(0.6) and value_at(q, r, 0.8) == pytest.approx(0.1)
    assert value_at(q, r, 0.1) is None and value_at(q, r, 0.81) is None  # no extrapolation


def test_value_at_on_a_non_monotone_curve_by_hand():
    """Precision dips at the third guidance value: fitted 0.2, 0.45, 0.45, 0.8; at 0.6 the
    recall is 3/7 of the way from the third point (0.45) to the fourth (0.1): 0.3. At the
    plateau's own level, the mean of its recalls."""
    rows = [{"guidance": g, "precision": p, "recall": r}
            for g, p, r in [(3.0, 0.8, 0.1), (0.5, 0.2, 0.6), (1.0, 0.5, 0.5), (2.0, 0.4, 0.45)]]
    q, r = curve(rows, "precision", "recall")  # sorted by guidance
    assert np.allclose(q, [0.2, 0.45, 0.45, 0.8]) and r.tolist() == [0.6, 0.5, 0.45, 0.1]
    assert value_at(q, r, 0.6) == pytest.approx(0.3)
    assert value_at(q, r, 0.45) == pytest.approx(0.475)


def test_match_level_is_the_midpoint_of_the_common_range():
    assert common_range([(0.2, 0.8), (0.4, 0.9), (0.1, 0.6)]) == (0.4, 0.6)
    assert match_level([(0.2, 0.8), (0.4, 0.9), (0.1, 0.6)])["level"] == pytest.approx(0.5)
    assert match_level([(0.2, 0.3), (0.4, 0.9)])["level"] is None  # no overlap
    assert match_level([(0.2, 0.3), (0.4, 0.9)], fixed=0.5)["level"] == 0.5


def _sweep(variant, seed, points):
    return {"variant": variant, "seed": seed, "feature_extractor": "evaluator",
            "rows": [{"guidance": g, "precision": p, "recall": r, "class_accuracy": a,
                      "diversity": d, "fid": f, "n_samples": 100} for g, p, r, a, d, f in points]}


def test_summarize_pairs_seeds_with_the_baselines_by_hand():
    """Two variants, two seeds. Precision ranges: ce s0 0.2-0.8, s1 0.3-0.9; up s0 0.4-0.8,
    s1 0.2-0.6 -> common 0.4-0.6, level 0.5. Recall at 0.5: ce s0 0.45, s1 0.4 (linear
    halfway / on a point), up s0 0.5, s1 0.55 -> paired up - ce: +0.05, +0.15."""
    ce0 = _sweep("ce", 0, [(1, 0.2, 0.6, 0.8, 1.0, 5), (2, 0.8, 0.3, 1.0, 0.5, 4)])
    ce1 = _sweep("ce", 1, [(1, 0.3, 0.5, 0.8, 1.0, 5), (2, 0.5, 0.4, 0.9, 0.8, 4),
                           (3, 0.9, 0.2, 1.0, 0.4, 3)])
    up0 = _sweep("up", 0, [(1, 0.4, 0.6, 0.8, 1.2, 5), (2, 0.8, 0.2, 1.0, 0.6, 4)])
    up1 = _sweep("up", 1, [(1, 0.2, 0.7, 0.8, 1.2, 5), (2, 0.6, 0.5, 1.0, 0.6, 4)])
    summary = summarize({"ce": {0: ce0, 1: ce1}, "up": {0: up0, 1: up1}}, ["ce", "ce+ts"])
    assert summary["levels"]["precision"]["level"] == pytest.approx(0.5)
    assert summary["variants"]["ce"]["recall_at_precision"]["values"] == pytest.approx([0.45, 0.4])
    assert summary["variants"]["up"]["recall_at_precision"]["values"] == pytest.approx([0.5, 0.55])
    assert summary["variants"]["up"]["recall_at_precision"]["mean"] == pytest.approx(0.525)
    diff = summary["paired"]["ce"]["up"]["recall_at_precision"]
    assert diff["mean"] == pytest.approx(0.1) and diff["seeds"] == [0, 1]
    half = 12.706 * math.sqrt(0.005) / math.sqrt(2)  # t(0.975, 1) * sd / sqrt(n)
    assert diff["low"] == pytest.approx(0.1 - half, abs=1e-3)
    assert list(summary["paired"]) == ["ce"]  # ce+ts absent: no table for it
    # class accuracy: every run spans 0.8-1.0, level 0.9; diversity there: ce s0 halfway
    # between 1.0 and 0.5, s1 on its middle point
    assert summary["levels"]["class_accuracy"]["level"] == pytest.approx(0.9)
    assert summary["variants"]["ce"]["diversity_at_class_accuracy"]["values"] == pytest.approx([0.75, 0.8])
    table = markdown(summary)
    assert "recall @ precision 0.5" in table and "Paired with `ce`" in table


# -- guidance on a toy model: precision up, recall down ------------------------------------

GRID = 24  # tokens: the cells of a GRID x GRID grid over [-3, 3]^2 (one token = one "image")
CELL = 6.0 / GRID
CENTRES = torch.stack(torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij"), -1
                      ).reshape(-1, 2).double() * CELL - 3.0 + CELL / 2
MEANS = torch.tensor([[-1.5, 0.0], [1.5, 0.0]], dtype=torch.float64)
SIGMA, MODEL_T = 0.45, 4.0  # the truth's spread; the model is under-confident (T = 4)
UNCOND_SIGMA = 2.0  # the unconditional prediction: one broad bump over both classes


def true_log_p() -> torch.Tensor:
    """log p(token | class) of the truth: a discretised Gaussian per class (classes, V)."""
    logits = -(CENTRES[None] - MEANS[:, None]).pow(2).sum(-1) / (2 * SIGMA ** 2)
    return logits.log_softmax(-1)


class ToyVAR:
    """One scale of one token: conditional logits log p(x|c) / T (too wide), unconditional
    a broad Gaussian around the origin; the real sampler mixes them. Guidance sharpens each
    class towards (and a little beyond) its mean: samples move inside the real data
    (precision up) and stop covering its spread (recall down)."""

    patch_nums = (1,)
    num_classes = 2

    def __init__(self):
        self.scale_ids = torch.zeros(1)
        cond = (true_log_p() / MODEL_T).log_softmax(-1)
        uncond = (-CENTRES.pow(2).sum(-1) / (2 * UNCOND_SIGMA ** 2)).log_softmax(-1)
        self.logits = torch.cat((cond, uncond[None])).float()

    def enable_kv_cache(self, enabled):
        pass

    def forward_scale(self, k, labels, x_k):
        return self.logits[labels][:, None]


class ToyTokenizer:
    latent_side, latent_channels = 1, 2

    def next_var_input(self, k, f_hat, idx):
        return f_hat + CENTRES[idx.flatten()].float().view(-1, 2, 1, 1), None

    def fhat_to_image(self, f_hat):
        return f_hat / 3


def jittered(tokens: torch.Tensor, seed: int) -> torch.Tensor:
    """Continuous features: the cell centre plus a uniform draw inside the cell (no ties)."""
    g = torch.Generator().manual_seed(seed)
    return CENTRES[tokens] + (torch.rand(len(tokens), 2, generator=g, dtype=torch.float64) - 0.5) * CELL


@pytest.mark.parametrize("draw", ["inverse_cdf", "multinomial"])
def test_guidance_moves_precision_up_and_recall_down(draw):
    n = 300
    labels = torch.arange(2).repeat_interleave(n)
    g = torch.Generator().manual_seed(0)
    real_tokens = torch.cat([torch.multinomial(true_log_p()[c].exp(), n, replacement=True, generator=g)
                             for c in range(2)])
    quality = SubsetQuality(jittered(real_tokens, 1), FidelityConfig(pr_neighborhood=3))
    precision, recall = [], []
    for guidance in [0.0, 1.0, 3.0, 8.0]:
        _, indices, _ = sample(ToyVAR(), ToyTokenizer(), labels, guidance=guidance,
                               guidance_schedule="constant", generator=torch.Generator().manual_seed(0),
                               code_to_cluster=torch.arange(GRID * GRID) % 4, num_clusters=4,
                               draw=draw)
        row = quality(jittered(indices[0].flatten(), 2))
        precision.append(row["precision"])
        recall.append(row["recall"])
    # each step moves the right way up to sampling noise (600 samples: a rate's standard
    # error is below 0.02); the ends move by more than twice that, with either draw
    assert all(b >= a - 0.02 for a, b in zip(precision[:-1], precision[1:], strict=True)), precision
    assert all(b <= a + 0.02 for a, b in zip(recall[:-1], recall[1:], strict=True)), recall
    assert precision[-1] - precision[0] > 0.05 and recall[0] - recall[-1] > 0.05, (precision, recall)


# -- the stages: sweep files, frontier outputs, cached ----------------------------------------

@pytest.mark.slow  # the tiny pipeline up to frontier: ~140 s on 2 shared cores
def test_sweep_and_frontier_stages_are_cached(tmp_path):
    project = copy_project(tmp_path / "p", {**TINY, "sweep": {"guidance": [0.5, 3.0], "n_per_class": 4}})
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["variants"] = {"ce": {"loss": "ce"}}  # the teacher and its ts version only
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro", "frontier"], project)
    for name in ("ce", "ce+ts"):
        sweep = json.loads((project / f"metrics/sweep-{name}-s0.json").read_text())
        assert [r["guidance"] for r in sweep["rows"] if r["axis"] == "guidance"] == [0.5, 3.0]
        assert {r["n_samples"] for r in sweep["rows"]} == {40} and sweep["seed"] == 0
        for key in ("fid", "precision", "recall", "class_accuracy"):
            assert all(isinstance(r[key], float) for r in sweep["rows"]), key
    summary = json.loads((project / "results/frontier.json").read_text())
    assert list(summary["variants"]) == ["ce", "ce+ts"] and list(summary["paired"]) == ["ce", "ce+ts"]
    assert (project / "results/frontier.png").stat().st_size > 0
    assert "matched" in (project / "results/frontier.md").read_text()
    again = run(["dvc", "repro", "frontier"], project).stdout
    assert "Running stage" not in again, again


def test_pairs_are_read_over_their_own_range_when_no_global_level_exists():
    """ls's precision range (0.1-0.3) misses up's (0.5-0.9): no level common to every
    run, yet ce (0.2-0.8) shares 0.2-0.3 with ls and 0.5-0.8 with up. The curves are
    straight there, so the mean gap over the range is the gap at its middle: at 0.25 ls
    0.8 - 0.75 * 0.1 = 0.725, ce 0.6 - 0.4 / 12 = 0.5667; at 0.65 up 0.6 - 0.375 * 0.4 =
    0.45, ce 0.6 - 0.75 * 0.4 = 0.3."""
    ce = _sweep("ce", 0, [(1, 0.2, 0.6, 0.8, 1.0, 5), (2, 0.8, 0.2, 1.0, 0.5, 4)])
    ls = _sweep("ls", 0, [(1, 0.1, 0.8, 0.8, 1.0, 5), (2, 0.3, 0.7, 1.0, 0.5, 4)])
    up = _sweep("up", 0, [(1, 0.5, 0.6, 0.8, 1.0, 5), (2, 0.9, 0.2, 1.0, 0.5, 4)])
    summary = summarize({"ce": {0: ce}, "ls": {0: ls}, "up": {0: up}}, ["ce"])
    assert summary["levels"]["precision"]["level"] is None
    pairs = summary["paired"]["ce"]
    assert pairs["ls"]["recall_at_precision"]["range"] == pytest.approx([0.2, 0.3])
    assert pairs["ls"]["recall_at_precision"]["mean"] == pytest.approx(0.725 - (0.6 - 0.4 / 12))
    assert pairs["up"]["recall_at_precision"]["range"] == pytest.approx([0.5, 0.8])
    assert pairs["up"]["recall_at_precision"]["mean"] == pytest.approx(0.45 - 0.3)
    assert pairs["up"]["recall_at_precision"]["levels"] == LEVELS == 11


def test_pair_difference_is_the_mean_gap_over_the_range_not_the_midpoint():
    """ce bends at precision 0.4 (recall 0.6 flat, then falling 1 per unit), up is
    straight: gap(q) = 0.2 - 2/3 (q - 0.2) + max(0, q - 0.4) on 0.2-0.8. On the 11 levels
    0.2, 0.26, ... 0.8 the first term sums to 0 and the bend adds 0.04 + 0.10 + ... + 0.40
    = 1.54: mean 0.14, where the midpoint (0.5) alone reads 0.1."""
    ce = _sweep("ce", 0, [(1, 0.2, 0.6, 0.8, 1.0, 5), (2, 0.4, 0.6, 0.9, 0.8, 4),
                          (3, 0.8, 0.2, 1.0, 0.5, 3)])
    up = _sweep("up", 0, [(1, 0.2, 0.8, 0.8, 1.0, 5), (3, 0.8, 0.4, 1.0, 0.5, 3)])
    cell = summarize({"ce": {0: ce}, "up": {0: up}}, ["ce"])["paired"]["ce"]["up"]["recall_at_precision"]
    assert cell["range"] == pytest.approx([0.2, 0.8]) and cell["mean"] == pytest.approx(0.14)
    assert cell["values"] == pytest.approx([0.14]) and cell["p"] is None  # one seed


def test_a_pair_that_shares_its_samples_is_printed_equal_not_as_a_zero_interval():
    """`ce+ts` samples `ce`'s images: in every seed the two curves are one, so the paired
    difference has no spread, no interval and no test, as in the report's tables."""
    points = [(1, 0.2, 0.6, 0.8, 1.0, 5), (2, 0.8, 0.2, 1.0, 0.5, 4)]
    sweeps = {"ce": {s: _sweep("ce", s, points) for s in (0, 1)},
              "ce+ts": {s: _sweep("ce+ts", s, points) for s in (0, 1)}}
    summary = summarize(sweeps, ["ce"])
    cell = summary["paired"]["ce"]["ce+ts"]["recall_at_precision"]
    assert cell["values"] == [0.0, 0.0] and cell["low"] == cell["high"] == 0.0
    paired = markdown(summary).split("Paired with `ce`")[1]
    row = next(line for line in paired.splitlines() if line.startswith("| ce+ts | 0,1"))
    assert "= (equal) over" in row and "+0 [" not in row


def _rows(axis, points, **fields):
    return [{"axis": axis, "precision": p, "recall": r, "class_accuracy": a, "diversity": d,
             "fid": 1.0, "n_samples": 10, **fields, **extra} for p, r, a, d, extra in points]


def test_temperature_rows_are_a_curve_of_their_own_ordered_from_hot_to_cold():
    """ce's temperature rows (guidance 2 throughout) are the curve 'ce (temperature)':
    sorted by falling temperature, precision rises 0.3 -> 0.5 -> 0.7 (no pooling) and the
    recall at 0.6 is halfway between 0.5 and 0.3. Truncation rows form the table: the
    untruncated row at guidance 2 beside the truncated one."""
    guidance = _rows("guidance", [(0.2, 0.6, 0.8, 1.0, {"guidance": 1.0}),
                                  (0.8, 0.2, 1.0, 0.5, {"guidance": 2.0})], temperature=1.0)
    hot = _rows("temperature", [(0.5, 0.5, 0.9, 0.9, {"temperature": 1.0}),
                                (0.3, 0.7, 0.85, 1.1, {"temperature": 1.25}),
                                (0.7, 0.3, 0.95, 0.7, {"temperature": 0.8})], guidance=2.0)
    cut = _rows("truncation", [(0.9, 0.1, 1.0, 0.4, {"top_k": 90, "top_p": 0.95})],
                guidance=2.0, temperature=1.0)
    ce = {"variant": "ce", "seed": 0, "feature_extractor": "evaluator", "rows": guidance + hot + cut}
    up = _sweep("up", 0, [(1, 0.2, 0.9, 0.8, 1.0, 5), (2, 0.8, 0.3, 1.0, 0.6, 4)])  # old format
    summary = summarize({"ce": {0: ce}, "up": {0: up}}, ["ce", "ce (temperature)"])
    assert list(summary["variants"]) == ["ce", "up", "ce (temperature)"]
    assert summary["variants"]["ce (temperature)"]["temperature"] == [0.8, 1.0, 1.25]
    assert [r["temperature"] for r in summary["curves"]["ce (temperature)"]] == [1.25, 1.0, 0.8]
    assert [r["guidance"] for r in summary["curves"]["ce"]] == [1.0, 2.0]  # no temperature rows
    # up vs ce (temperature): common precision 0.3-0.7, both straight there: the mean gap is
    # the gap at 0.5, up 0.9 - 0.6 * 0.5 = 0.6 against 0.5
    cell = summary["paired"]["ce (temperature)"]["up"]["recall_at_precision"]
    assert cell["range"] == pytest.approx([0.3, 0.7]) and cell["mean"] == pytest.approx(0.1)
    table = summary["truncation"]["ce"]
    assert list(table) == ["untruncated", "top-k 90, top-p 0.95"]
    assert table["untruncated"]["precision"]["mean"] == 0.8
    assert table["top-k 90, top-p 0.95"]["diversity"]["values"] == [0.4]
    text = markdown(summary)
    assert "sampling-temperature sweep 0.8, 1, 1.25" in text and "### Truncated sampling" in text
    assert "| ce | top-k 90, top-p 0.95 | 2 | 0 |" in text
