"""Where every stage reads and writes: the one place for file names (dvc.yaml
spells the same paths for DVC)."""

from __future__ import annotations

from pathlib import Path

PREPARED = Path("data/prepared")
TOKENS = Path("data/tokens")
TOKENIZER = Path("models/tokenizer.pt")
EVALUATOR = Path("models/evaluator.pt")
REFERENCE = Path("models/reference.pt")
CHECKPOINTS = Path("checkpoints")


def run_tag(variant: str, seed: int) -> str:
    """The name of one variant's run with one training seed: ``ce-s0``."""
    return f"{variant}-s{seed}"


def model(variant: str, seed: int) -> Path:
    return Path("models") / f"var-{run_tag(variant, seed)}.pt"


def samples(variant: str, seed: int) -> Path:
    return Path("samples") / run_tag(variant, seed)


def split(kind: Path, name: str) -> Path:
    """One split (train | val | test) of the prepared images or of the token cache."""
    return kind / f"{name}.pt"


def metrics(name: str) -> Path:
    """metrics/<name>.json: ``tokenizer``, ``train-ce-s0``, ``eval-ce-s0`` ..."""
    return Path("metrics") / f"{name}.json"


def sweep(variant: str, seed: int) -> Path:
    """metrics/sweep-{variant}-s{seed}.json, written by the sweep@ stage."""
    return metrics(f"sweep-{run_tag(variant, seed)}")


def eval_plots(variant: str, seed: int) -> Path:
    return Path("plots/eval") / run_tag(variant, seed)
