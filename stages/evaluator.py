"""evaluator: train the small CNN whose features make FID/KID/IS/PR run offline."""

from __future__ import annotations

from pathlib import Path

from up.config import Params
from up.evaluator import accuracy, save_evaluator, train_evaluator
from up.io import load_torch, save_json
from up.runtime import resolve_device

PREPARED = Path("data/prepared")
OUT = Path("models/evaluator.pt")


def run(params: Params) -> None:
    cfg = params.evaluator
    device = resolve_device(params.device)
    train = load_torch(PREPARED / "train.pt", "prepared train split")
    test = load_torch(PREPARED / "test.pt", "prepared test split")
    num_classes = len(train["classes"])
    model = train_evaluator(train["images"], train["labels"], num_classes, widths=cfg.widths,
                            feature_dim=cfg.feature_dim, feature_scale=cfg.feature_scale,
                            steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                            seed=params.seed, device=device)
    train_acc = accuracy(model, train["images"], train["labels"], device)
    test_acc = accuracy(model, test["images"], test["labels"], device)
    save_evaluator(model.cpu(), OUT, classes=train["classes"], seed=params.seed)
    save_json({"train_accuracy": train_acc, "test_accuracy": test_acc,
               "feature_multiplier": model.feature_multiplier, "n_train": len(train["labels"]),
               "n_test": len(test["labels"]), "seed": params.seed}, "metrics/evaluator.json")
    print(f"evaluator: test accuracy {test_acc:.4f} on {len(test['labels'])} images")
