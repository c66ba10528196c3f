"""Calibration of token predictions: ECE, reliability bins, NLL, Brier score.

Top-1 confidence in equal-width bins (lower, upper] over [0, 1] (Guo et al.
2017; a confidence of exactly 0 falls in the first bin). The statistics are
sums, so :class:`CalibrationMeter` accumulates them batch by batch and a
whole split never has to sit in memory as (N, V) probabilities.
"""

from __future__ import annotations

import torch

from up.evaluation.metrics import Metric

# Token accuracy has no arrow: a sharper, worse-calibrated model can gain it.
METRICS = (
    Metric("ece", "ECE", "lower", main=True, paired=True, headline=True),
    Metric("nll", "NLL", "lower", main=True, paired=True),
    Metric("brier", "Brier", "lower", main=True),
    Metric("token_accuracy", "token acc", main=True),
)
# The library's bin count when none is given; the pipeline passes evaluate.ece_bins.
N_BINS = 15


def _bin_index(confidences: torch.Tensor, n_bins: int) -> torch.Tensor:
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64,
                           device=confidences.device)[1:-1]
    return torch.bucketize(confidences.double(), edges)  # edges[i-1] < c <= edges[i]


def _bin_sums(confidences: torch.Tensor, correct: torch.Tensor, n_bins: int) -> torch.Tensor:
    """(3, n_bins) float64: count, sum of confidences, number correct per bin."""
    index = _bin_index(confidences.reshape(-1), n_bins)
    conf = confidences.reshape(-1).double()
    hits = correct.reshape(-1).double()
    return torch.stack([torch.bincount(index, minlength=n_bins).double(),
                        torch.bincount(index, weights=conf, minlength=n_bins),
                        torch.bincount(index, weights=hits, minlength=n_bins)])


def _ece(sums: torch.Tensor) -> float:
    total = float(sums[0].sum())
    return float((sums[1] - sums[2]).abs().sum()) / total if total else 0.0


def _bins(sums: torch.Tensor) -> list[dict[str, float]]:
    n_bins = sums.shape[1]
    rows = []
    for b in range(n_bins):
        count = float(sums[0, b])
        rows.append(dict(lower=b / n_bins, upper=(b + 1) / n_bins, count=int(count),
                         accuracy=float(sums[2, b]) / count if count else 0.0,
                         confidence=float(sums[1, b]) / count if count else 0.0))
    return rows


def expected_calibration_error(confidences: torch.Tensor, correct: torch.Tensor,
                               n_bins: int = N_BINS) -> float:
    """sum_b (n_b / N) |accuracy_b - confidence_b| over equal-width bins."""
    return _ece(_bin_sums(confidences, correct, n_bins))


def reliability_bins(confidences: torch.Tensor, correct: torch.Tensor,
                     n_bins: int = N_BINS) -> list[dict[str, float]]:
    """One row per bin: lower, upper, count, accuracy, confidence (a reliability
    diagram). Empty bins have count 0 and accuracy = confidence = 0: skip them
    when plotting."""
    return _bins(_bin_sums(confidences, correct, n_bins))


class CalibrationMeter:
    """Accumulates token calibration statistics over batches of logits.

    NLL is the mean -log p(y); Brier is the mean multi-class Brier score
    sum_k (p_k - onehot(y)_k)^2 (range [0, 2]); accuracy is top-1.
    """

    def __init__(self, n_bins: int = N_BINS, chunk: int = 8192):
        self.n_bins, self.chunk = n_bins, chunk
        self.sums = torch.zeros(3, n_bins, dtype=torch.float64)
        self.nll = self.brier = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """logits (..., V), targets (...)."""
        logits = logits.reshape(-1, logits.shape[-1])
        targets = targets.reshape(-1)
        for start in range(0, logits.shape[0], self.chunk):
            z = logits[start:start + self.chunk]
            z = z if z.dtype in (torch.float32, torch.float64) else z.float()
            y = targets[start:start + self.chunk].unsqueeze(1)
            log_p = torch.log_softmax(z, 1)
            p = log_p.exp()
            p_y = p.gather(1, y).squeeze(1)
            confidence, prediction = p.max(1)
            self.sums += _bin_sums(confidence, prediction == y.squeeze(1), self.n_bins).cpu()
            self.nll -= float(log_p.gather(1, y).double().sum())
            self.brier += float((p.square().sum(1) - 2.0 * p_y + 1.0).double().sum())
            self.count += z.shape[0]

    def compute(self) -> dict[str, float]:
        """ece, nll, brier, accuracy over every token added so far."""
        if not self.count:
            raise ValueError("no tokens were added to the calibration meter")
        return dict(ece=_ece(self.sums), nll=self.nll / self.count,
                    brier=self.brier / self.count,
                    accuracy=float(self.sums[2].sum()) / self.count)

    def figures(self) -> dict[str, float]:
        """The declared METRICS, keyed as in metrics/eval-*.json."""
        calib = self.compute()
        return {"ece": calib["ece"], "nll": calib["nll"], "brier": calib["brier"],
                "token_accuracy": calib["accuracy"]}

    def bins(self) -> list[dict[str, float]]:
        return _bins(self.sums)


def token_calibration(logits: torch.Tensor, targets: torch.Tensor,
                      n_bins: int = N_BINS) -> dict[str, float]:
    """ECE, NLL, Brier score and accuracy of logits (..., V) for targets (...)."""
    meter = CalibrationMeter(n_bins)
    meter.update(logits, targets)
    return meter.compute()
