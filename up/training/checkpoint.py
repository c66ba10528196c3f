"""Resumable training state: model, optimizer, step and every RNG, saved atomically."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from up.core.io import load_torch, save_torch


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        # numpy's key array as plain ints: checkpoints load with weights_only=True
        state["numpy"] = (kind, keys.tolist(), pos, has_gauss, gauss)
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, **state: Any) -> None:
    """Save ``state`` plus the RNG states; the file appears only when complete."""
    save_torch({**state, "rng": rng_state()}, path)


def load_checkpoint(path: str | Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """Load a checkpoint to resume from, or None when there is none.

    ``fingerprint`` holds the settings that define the run (params, seed); a
    checkpoint written under other settings is ignored, never silently mixed in.
    """
    path = Path(path)
    if not path.is_file():
        return None
    state = load_torch(path, "checkpoint")
    if state.get("fingerprint") != fingerprint:
        return None
    restore_rng(state["rng"])
    return state
