"""prepare: read the data source, conform images, split, write memory-mappable arrays.

Images are decoded (by ``data.workers`` processes) and written block by block
into data/prepared/images.npy, so the stage's memory does not grow with the
number of images; the split is made once every file's fate is known, and
stored as row numbers (no copy of the pixels).
"""

from __future__ import annotations

import numpy as np
import torch

from up.core import paths
from up.core.errors import StageError
from up.core.io import save_image_grid, save_json
from up.core.params import Params
from up.core.runtime import progress
from up.data.sources import RawData, decoded, load_source, spread_classes, stratified_split
from up.data.splits import array_writer, load_image_split, save_split_index

BLOCK = 512  # images written per block


def preview_rows(labels: torch.Tensor, classes: int, per_class: int, max_classes: int) -> list[int]:
    """Row numbers of the preview grid: the first ``per_class`` items of at most
    ``max_classes`` classes, evenly spaced over the class ids; -1 pads a short class."""
    rows = []
    for cls in spread_classes(torch.arange(classes), max_classes).tolist():
        members = torch.nonzero(labels == cls).flatten()[:per_class].tolist()
        rows += members + [-1] * (per_class - len(members))
    return rows


def write_images(raw: RawData, cfg, workers: int) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Decode every item into data/prepared/images.npy; (kept flags, skipped files)."""
    n = len(raw.items)
    kept, skipped, block, start = np.zeros(n, dtype=bool), [], [], 0
    blank = np.zeros((cfg.channels, cfg.image_size, cfg.image_size), dtype=np.uint8)
    with array_writer(paths.PREPARED / paths.IMAGES, (n, *blank.shape), np.uint8) as writer, \
            progress() as bar:
        task = bar.add_task("prepare: decode", total=n, info="")
        for number, image, reason in decoded(raw, cfg.channels, cfg.image_size, cfg.fit, workers):
            if image is None:
                skipped.append({"path": str(raw.items[number]), "reason": reason})
            kept[number] = image is not None
            block.append(blank if image is None else image)
            if len(block) == BLOCK or number == n - 1:
                writer.write(start, np.stack(block))
                start, block = start + len(block), []
                bar.update(task, completed=start, info=f"{len(skipped)} skipped")
    return kept, skipped


def run(params: Params) -> None:
    cfg = params.data
    # listed first: a data.classes the source cannot satisfy stops before anything changes
    raw = load_source(cfg.source, cfg.root, cfg.download, cfg.classes, params.seed)
    for old in paths.PREPARED.glob("*.npy"):  # never pair old pixels with new splits
        old.unlink()
    kept, skipped = write_images(raw, cfg, cfg.workers)
    rows = np.nonzero(kept)[0]
    labels = raw.labels[torch.from_numpy(rows)]
    empty = sorted(set(range(len(raw.classes))) - set(labels.unique().tolist()))
    if empty:
        raise StageError(f"{cfg.source}: class {raw.classes[empty[0]]!r} has no readable image")
    splits = stratified_split(labels, cfg.val_fraction, cfg.test_fraction, params.seed)
    save_split_index(paths.PREPARED, {name: rows[index.numpy()] for name, index in splits.items()},
                     raw.labels.numpy(), raw.classes)

    counts = {}
    for name, index in splits.items():
        per_class = torch.bincount(labels[index], minlength=len(raw.classes)).tolist()
        counts[name] = {"total": len(index),
                        "per_class": dict(zip(raw.classes, per_class, strict=True))}
    save_json(skipped, paths.PREPARED / paths.SKIPPED)
    # data.classes is recorded when it selects (classes.json lists the classes kept); left out
    # when null, so the record of a run that selects nothing is the same file as before the key
    unrecorded = {"workers"} | ({"classes"} if cfg.classes is None else set())
    save_json({"source": cfg.source, "seed": params.seed,
               **params.data.model_dump(exclude=unrecorded)}, paths.PREPARED / paths.RECORD)
    save_json({"source": cfg.source, "images": int(kept.sum()), "classes": len(raw.classes),
               "skipped": len(skipped), "splits": counts}, paths.metrics("prepare"))

    train = load_image_split(paths.PREPARED, "train")
    shown = preview_rows(train.labels, len(raw.classes), cfg.preview_per_class, cfg.preview_classes)
    picked = train.images[[max(r, 0) for r in shown]]
    picked[torch.tensor(shown) < 0] = 0
    save_image_grid(picked, paths.PREPARE_PREVIEW, nrow=cfg.preview_per_class)
