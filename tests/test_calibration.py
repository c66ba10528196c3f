"""ECE, reliability bins, NLL and Brier score against hand-computed values."""

import math

import pytest
import torch

from up.evaluation.calibration import (
    CalibrationMeter,
    expected_calibration_error,
    reliability_bins,
    token_calibration,
)


def test_ece_by_hand():
    confidences = torch.tensor([0.95, 0.95, 0.15, 0.15], dtype=torch.float64)
    correct = torch.tensor([True, False, False, False])
    # bin (0.9, 1]: accuracy 0.5 vs confidence 0.95; bin (0.1, 0.2]: 0 vs 0.15
    assert expected_calibration_error(confidences, correct, 10) == pytest.approx(
        0.5 * 0.45 + 0.5 * 0.15)
    assert expected_calibration_error(torch.tensor([0.8] * 5, dtype=torch.float64),
                                      torch.tensor([1, 1, 1, 1, 0]), 15) == pytest.approx(0.0)


def test_reliability_bins_edges_and_values():
    # Upper edges belong to their bin: 0.2 -> (0.1, 0.2]; 1.0 -> last bin; 0 -> first bin.
    confidences = torch.tensor([0.2, 0.2000001, 1.0, 0.0, 0.05], dtype=torch.float64)
    correct = torch.tensor([1, 0, 1, 0, 1])
    rows = reliability_bins(confidences, correct, 10)
    assert [row["count"] for row in rows] == [2, 1, 1, 0, 0, 0, 0, 0, 0, 1]
    assert rows[1]["lower"] == pytest.approx(0.1) and rows[1]["upper"] == pytest.approx(0.2)
    assert rows[0]["accuracy"] == 0.5 and rows[0]["confidence"] == pytest.approx(0.025)
    assert rows[2]["accuracy"] == 0.0 and rows[2]["confidence"] == pytest.approx(0.2000001)
    assert rows[5] == dict(lower=0.5, upper=0.6, count=0, accuracy=0.0, confidence=0.0)


def test_token_calibration_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1]], dtype=torch.float64)
    targets = torch.tensor([0, 0])
    stats = token_calibration(probs.log(), targets, n_bins=15)
    assert stats["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.4)) / 2)
    # Brier: (0.3^2 + 0.2^2 + 0.1^2 + 0.6^2 + 0.5^2 + 0.1^2) / 2
    assert stats["brier"] == pytest.approx((0.14 + 0.62) / 2)
    assert stats["accuracy"] == 0.5
    # token 1: right with 0.7; token 2: wrong with 0.5; different bins
    assert stats["ece"] == pytest.approx((0.3 + 0.5) / 2)


def test_meter_over_batches_and_chunks_equals_one_pass():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, 12, generator=gen) * 2
    targets = torch.randint(0, 12, (4, 50), generator=gen)
    whole = token_calibration(logits, targets)
    meter = CalibrationMeter(n_bins=15, chunk=7)
    meter.update(logits[:1], targets[:1])
    meter.update(logits[1:], targets[1:])
    for key, value in meter.compute().items():
        assert value == pytest.approx(whole[key], rel=1e-9), key
    probs = torch.softmax(logits, -1)
    confidence, prediction = probs.max(-1)
    assert whole["ece"] == pytest.approx(
        expected_calibration_error(confidence, prediction == targets), rel=1e-6)
    assert sum(row["count"] for row in meter.bins()) == 200


def test_empty_meter_is_an_error():
    with pytest.raises(ValueError, match="no tokens"):
        CalibrationMeter().compute()
