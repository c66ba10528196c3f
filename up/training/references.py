"""References that do not move with the model being trained (docs/method.md §3).

The `up` loss compares the model's second-order dispersion with a
reference's (`kd` distils the teacher's). The calibrated and smoothed
references are computed inside the loss from the logits or the target; the
two here need more than that, so the training step asks them for p_ref per
batch. Only the mean p_ref is passed: the loss reads model and reference at
one evidence mass (``up.kappa``), whatever the reference's own evidence.

- :class:`TeacherReference`: softmax(z_T / T_s) of a frozen, trained model
  (one extra no-grad forward per step), its per-scale temperatures fitted
  once on the calibration slice before training.
- :class:`EmpiricalTableReference`: Dirichlet-smoothed code counts given a
  context (scale, parent code, class), counted once by the `reference` stage
  over the run's own training tokens (one table per training seed, which
  draws the training images). The counts' evidence n(c) + a_0 is not
  the comparison's: it acts through p_ref alone, a rare context's reference
  being close to the uniform prior.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from up.core.errors import StageError
from up.core.io import load_torch
from up.models import temperature
from up.models.transformer import VAR
from up.training.empirical import EmpiricalReference


class Reference(Protocol):
    def __call__(self, labels: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
                 ) -> torch.Tensor:
        """p_ref (B, L, V) for a batch: the labels the student sees (null where
        dropped), its teacher-forcing input, the targets."""
        ...

    def tensors(self) -> list[torch.Tensor]:
        """What defines the reference (for the resume fingerprint)."""
        ...


class TeacherReference:
    """p_ref = softmax(z_T / T_s): a frozen model's tempered prediction for the
    same input and (possibly dropped) label as the student."""

    def __init__(self, model: VAR, temperatures: torch.Tensor):
        self.model = model.eval().requires_grad_(False)
        self.inv_temp = temperature.inverse(temperatures, model.scale_ids)  # (L, 1)
        self.temperatures = temperatures

    @torch.no_grad()
    def __call__(self, labels, inputs, targets):
        return (self.model(labels, inputs).float() * self.inv_temp).softmax(-1)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.model.state_dict().values(), self.temperatures]


class EmpiricalTableReference:
    """The empirical reference table of the `reference` stage, for the images
    this run trains on."""

    def __init__(self, table: EmpiricalReference):
        self.table = table

    @classmethod
    def load(cls, path: Path, fit_ids: torch.Tensor, device: torch.device
             ) -> EmpiricalTableReference:
        saved = load_torch(path, "empirical reference")
        if not torch.equal(saved["fit_ids"], fit_ids.cpu()):
            raise StageError(f"{path} was counted on other training images than this run's "
                             "(train.calib_fraction, train.images_per_class, seed or the "
                             "training seed changed): rerun the reference stage")
        return cls(EmpiricalReference.from_state_dict(saved["table"]).to(device))

    @torch.no_grad()
    def __call__(self, labels, inputs, targets):
        # Leave one out: the batch's own tokens are in the counts; without this a
        # context seen once would look like a sure point mass on its target.
        return self.table.probs_and_evidence(targets, labels, leave_one_out=True)[0]

    def tensors(self) -> list[torch.Tensor]:
        return [v for v in self.table.state_dict().values() if torch.is_tensor(v)]
