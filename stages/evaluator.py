"""evaluator: train the small CNN whose features make FID/KID/IS/PR run offline."""

from __future__ import annotations

from up.core import paths
from up.core.io import save_json
from up.core.params import Params
from up.core.runtime import resolve_device
from up.data.splits import load_image_split
from up.evaluation.evaluator import accuracy, save_evaluator, train_evaluator


def run(params: Params) -> None:
    cfg = params.evaluator
    device = resolve_device(params.device)
    train = load_image_split(paths.PREPARED, "train")
    test = load_image_split(paths.PREPARED, "test")
    num_classes = len(train.classes)
    model = train_evaluator(train.images, train.labels, num_classes, widths=cfg.widths,
                            feature_dim=cfg.feature_dim, feature_scale=cfg.feature_scale,
                            steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                            warmup_steps=cfg.warmup_steps, eval_batch_size=cfg.eval_batch_size,
                            seed=params.seed, device=device)
    train_acc = accuracy(model, train.images, train.labels, cfg.eval_batch_size, device)
    test_acc = accuracy(model, test.images, test.labels, cfg.eval_batch_size, device)
    save_evaluator(model.cpu(), paths.EVALUATOR, classes=train.classes, seed=params.seed)
    save_json({"train_accuracy": train_acc, "test_accuracy": test_acc,
               "feature_multiplier": model.feature_multiplier, "n_train": len(train),
               "n_test": len(test), "seed": params.seed}, paths.metrics("evaluator"))
    print(f"evaluator: test accuracy {test_acc:.4f} on {len(test)} images")
