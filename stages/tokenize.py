"""tokenize: encode every split once, so transformer training never runs the encoder.

Images are read and token rows written one batch at a time (memory-mapped
arrays, see up/data/splits.py): the stage's memory does not grow with the data.
"""

from __future__ import annotations

import torch

from up.core import paths
from up.core.params import Params
from up.core.runtime import progress, resolve_device
from up.data.splits import (
    SPLITS,
    array_writer,
    load_image_split,
    save_token_labels,
    save_token_meta,
    token_path,
)
from up.models.tokenizer import index_dtype, load_tokenizer, tokenize_images


def run(params: Params) -> None:
    batch = params.tokenize.batch_size
    device = resolve_device(params.device)
    model = load_tokenizer(paths.TOKENIZER, device)
    length = sum(p * p for p in model.patch_nums)
    dtype = torch.empty(0, dtype=index_dtype(model.vocab_size)).numpy().dtype
    with progress() as bar:
        for split in SPLITS:
            data = load_image_split(paths.PREPARED, split)
            task = bar.add_task(f"tokenize {split}", total=len(data), info="")
            with array_writer(token_path(paths.TOKENS, split), (len(data), length), dtype) as out:
                for start, images in data.images.chunks(batch):
                    out.write(start, tokenize_images(model, images, batch, device).numpy())
                    bar.update(task, completed=start + len(images))
            save_token_labels(paths.TOKENS, split, data.labels)
            classes = data.classes
    save_token_meta(paths.TOKENS, classes, list(model.patch_nums))
