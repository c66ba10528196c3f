"""tokenize: encode every split once, so transformer training never runs the encoder."""

from __future__ import annotations

from up import paths
from up.config import Params
from up.io import load_torch, save_torch
from up.runtime import resolve_device
from up.tokenizer import load_tokenizer, tokenize_images

SPLITS = ("train", "val", "test")
BATCH = 256


def run(params: Params) -> None:
    device = resolve_device(params.device)
    model = load_tokenizer(paths.TOKENIZER, device)
    for split in SPLITS:
        data = load_torch(paths.split(paths.PREPARED, split), f"{split} split")
        tokens = tokenize_images(model, data["images"], BATCH, device)
        save_torch({"indices": tokens, "labels": data["labels"], "classes": data["classes"],
                    "patch_nums": list(model.patch_nums)}, paths.split(paths.TOKENS, split))
