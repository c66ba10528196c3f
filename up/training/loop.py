"""The step loop every trainer shares (tokenizer, evaluator, transformer).

Each trainer writes its own step (what is optimised differs); this module
owns what they must all do the same way: the progress bar, the periodic
checkpoint/log schedule, and the guard that stops a run whose loss or
gradient is no longer finite, with a one-line StageError raised *before* the
optimiser applies the bad update (so the weights and the last checkpoint
stay good).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from up.core.errors import StageError
from up.core.runtime import progress


def check_finite(values: dict[str, float], step: int, what: str, advice: str) -> None:
    """Raise StageError naming every non-finite value of ``values`` at ``step``."""
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        raise StageError(f"non-finite {' and '.join(bad)} at step {step} of {what}: {shown}; "
                         f"stopped before the update. {advice}")


class StepLoop:
    """``for step in StepLoop(...)`` runs steps ``start .. end - 1`` under a progress
    bar (``total`` is the run's full length, so a resumed run shows where it is).
    ``due(period)`` says whether the step just finished ends a period (or the run);
    ``info`` is shown beside the bar; ``console`` prints above it."""

    def __init__(self, description: str, total: int, start: int = 0, end: int | None = None,
                 show: bool = True):
        self.description, self.total, self.start = description, total, start
        self.end = total if end is None else min(end, total)
        self.show = show
        self.info = ""
        self.console = None
        self.done = start  # steps completed once the body of the current step has run

    def __iter__(self) -> Iterator[int]:
        with progress(disable=not self.show) as bar:
            self.console = bar.console
            task = bar.add_task(self.description, total=self.total, completed=self.start, info="")
            for step in range(self.start, self.end):
                self.done = step + 1
                yield step
                bar.update(task, completed=self.done, info=self.info)

    def due(self, period: int) -> bool:
        """True when the step now ending completes a multiple of ``period`` or the run."""
        return self.done % period == 0 or self.done == self.end
