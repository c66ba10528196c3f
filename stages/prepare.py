"""prepare: read the data source, conform images, split, save uint8 tensors."""

from __future__ import annotations

import torch

from up import paths
from up.config import Params
from up.data import conform, load_source, stratified_split
from up.io import save_image_grid, save_json, save_torch


def preview(images: torch.Tensor, labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """The first ``per_class`` images of every class, one class per row."""
    rows = []
    for cls in torch.unique(labels).tolist():
        picked = images[labels == cls][:per_class]
        pad = torch.zeros((per_class - len(picked), *images.shape[1:]), dtype=images.dtype)
        rows.append(torch.cat([picked, pad]))
    return torch.cat(rows)


def run(params: Params) -> None:
    cfg = params.data
    raw = load_source(cfg.source, cfg.root, cfg.download)
    images = torch.stack([conform(img, cfg.channels, cfg.image_size, cfg.fit)
                          for img in raw.images])
    splits = stratified_split(raw.labels, cfg.val_fraction, cfg.test_fraction, params.seed)
    counts = {}
    for name, index in splits.items():
        labels = raw.labels[index]
        save_torch({"images": images[index].contiguous(), "labels": labels.clone(),
                    "classes": raw.classes}, paths.split(paths.PREPARED, name))
        per_class = torch.bincount(labels, minlength=len(raw.classes)).tolist()
        counts[name] = {"total": len(index),
                        "per_class": dict(zip(raw.classes, per_class, strict=True))}
    save_json(raw.skipped, paths.PREPARED / "skipped.json")
    save_json({"source": cfg.source, "seed": params.seed, **params.data.model_dump()},
              paths.PREPARED / "params.json")
    save_json({"source": cfg.source, "images": len(images), "classes": len(raw.classes),
               "skipped": len(raw.skipped), "splits": counts}, paths.metrics("prepare"))
    train = splits["train"]
    save_image_grid(preview(images[train], raw.labels[train], cfg.preview_per_class),
                    "plots/prepare/preview.png", nrow=cfg.preview_per_class)
