"""Zero-shot editing: in-painting, out-painting and class-conditional editing (docs/method.md §6).

Editing is sampling with some tokens forced. The real image is encoded into its
multi-scale tokens; at every scale the cells that lie wholly in the known region keep
the image's own tokens and the others are sampled by ``sample`` (guidance, top-k/top-p,
temperature, the residual accumulation: all unchanged), so the fill is conditioned on
the known region at every scale through f_hat and the transformer's context.
Class-conditional editing is in-painting with another class label. The per-token
uncertainty ``sample`` records is read at the sampled positions only: a map of where
the model is unsure about the fill.

The mask-to-scale rule (``scale_masks``): the pixel mask is 1 where the fill goes
(unknown). A cell of scale p_k covers the pixels of adaptive max pooling's bin (rows
floor(i H / p_k) to ceil((i + 1) H / p_k), likewise columns); it is known only when no
masked pixel falls in its bin. When p_k does not divide the side the bins overlap, so a
cell that is partly masked is sampled, never forced: a forced token would carry the old
content into the fill.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from up.core.runtime import autocast
from up.generation.sampler import batch_generator, sample
from up.models.tokenizer import to_float

# The named masks (``named_mask``): the masked (filled) region of a side x side image.
# The halves are out-painting: the other half is known.
HALVES = ("left_half", "right_half", "top", "bottom")
SHAPES = ("center", *HALVES)
BOX = "box"  # 'box x0 y0 x1 y1': pixel columns x0..x1-1, rows y0..y1-1


class MaskError(ValueError):
    """A mask that cannot be used; the message is one line naming the input."""


def named_mask(spec: str, side: int) -> torch.Tensor:
    """The bool (side, side) mask (True = fill) of a named shape: ``center`` (the
    central square of half the side), ``left_half``, ``right_half``, ``top``, ``bottom``
    (that half of the image), or ``box x0 y0 x1 y1`` (columns x0 <= x < x1, rows
    y0 <= y < y1, in pixels, 0 <= x0 < x1 <= side)."""
    mask = torch.zeros(side, side, dtype=torch.bool)
    half, quarter = side // 2, side // 4
    words = spec.split()
    name = words[0] if words else ""
    if name == "center" and len(words) == 1:
        mask[quarter:side - quarter, quarter:side - quarter] = True
    elif name == "left_half" and len(words) == 1:
        mask[:, :half] = True
    elif name == "right_half" and len(words) == 1:
        mask[:, half:] = True
    elif name == "top" and len(words) == 1:
        mask[:half] = True
    elif name == "bottom" and len(words) == 1:
        mask[half:] = True
    elif name == BOX:
        try:
            x0, y0, x1, y1 = (int(w) for w in words[1:])
        except ValueError:
            raise MaskError(f"mask {spec!r}: a box is 'box x0 y0 x1 y1' (four integers)") from None
        if not (0 <= x0 < x1 <= side and 0 <= y0 < y1 <= side):
            raise MaskError(f"mask {spec!r}: the box must satisfy 0 <= x0 < x1 <= {side} and "
                            f"0 <= y0 < y1 <= {side}")
        mask[y0:y1, x0:x1] = True
    else:
        raise MaskError(f"mask {spec!r}: unknown shape (one of {', '.join(SHAPES)}, "
                        f"'box x0 y0 x1 y1')")
    return mask


def mask_from_image(path: str | Path, side: int) -> torch.Tensor:
    """A mask image (any format PIL reads; white = fill, black = keep, thresholded at
    half grey) as a bool (side, side) mask; the image must be side x side pixels."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MaskError(f"mask image {path}: not a file")
    if path.stat().st_size == 0:
        raise MaskError(f"mask image {path}: the file is empty")
    try:
        with Image.open(path) as img:
            gray = torch.from_numpy(np.array(img.convert("L"), dtype=np.uint8))
            width, height = img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise MaskError(f"mask image {path}: unreadable ({type(exc).__name__})") from None
    if (height, width) != (side, side):
        raise MaskError(f"mask image {path}: {width} x {height} pixels, the images are "
                        f"{side} x {side}")
    return gray.view(side, side) >= 128


def check_mask(mask: torch.Tensor, name: str) -> torch.Tensor:
    """``mask`` itself when it masks some pixels but not all; else a MaskError naming
    it: an empty mask would return the tokenizer's reconstruction, a full one plain
    sampling (``up generate``), neither an edit."""
    if not mask.any():
        raise MaskError(f"mask {name}: masks no pixel (nothing to fill)")
    if mask.all():
        raise MaskError(f"mask {name}: masks every pixel (that is sampling: use `up generate`)")
    return mask


def scale_masks(mask: torch.Tensor, patch_nums: list[int] | tuple[int, ...]) -> list[torch.Tensor]:
    """Pixel masks (B, H, W) (True = fill) -> per scale (B, p_k, p_k), True where the
    cell is sampled: adaptive max pooling, so a cell is known only when no masked pixel
    falls in its (possibly overlapping) bin."""
    pixels = mask[:, None].float()
    return [F.adaptive_max_pool2d(pixels, p)[:, 0] > 0 for p in patch_nums]


def known_tokens(tokens: list[torch.Tensor], unknown: list[torch.Tensor]) -> list[torch.Tensor]:
    """The ``known`` argument of ``sample``: the image's tokens, -1 where sampled."""
    return [torch.where(u.to(t.device), -1, t) for t, u in zip(tokens, unknown, strict=True)]


@dataclass
class Edited:
    """What ``edit`` returns for N edits."""

    images: torch.Tensor  # uint8 (N, C, H, W): the decoded edits
    tokens: list[torch.Tensor]  # (N, p_k, p_k) per scale: known ones forced, the rest sampled
    unknown: list[torch.Tensor]  # (N, p_k, p_k) bool per scale: True = sampled
    maps: dict[str, list[torch.Tensor]]  # sample's uncertainty maps (every position)


@torch.no_grad()
def edit(var, tokenizer, tokens: list[torch.Tensor], masks: torch.Tensor, labels: torch.Tensor, *,
         generator: torch.Generator, **kwargs) -> Edited:
    """Edit N images given by their ``tokens`` (``tokenizer.encode``; (N, p_k, p_k) per
    scale): fill the pixels where ``masks`` (N, H, W) is True, conditioned on
    ``labels`` (the requested class; another class than the image's = class-conditional
    editing). ``kwargs``: ``sample``'s sampling settings."""
    device = var.scale_ids.device
    unknown = scale_masks(masks.to(device), tokenizer.patch_nums)
    known = known_tokens([t.to(device) for t in tokens], unknown)
    out, drawn, unc = sample(var, tokenizer, labels, generator=generator, known=known, **kwargs)
    return Edited(out, drawn, [u.cpu() for u in unknown], unc["maps"])


@torch.no_grad()
def encode(tokenizer, images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The multi-scale tokens of uint8 ``images`` (N, C, H, W), on the CPU, in batches."""
    device = tokenizer.quantizer.embedding.weight.device
    parts = [tokenizer.encode(to_float(images[s:s + batch_size]).to(device))
             for s in range(0, len(images), batch_size)]
    return [torch.cat(scale).cpu() for scale in zip(*parts, strict=True)]


def edit_batches(var, tokenizer, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                 fills: int, batch_size: int, seed: int, bf16: bool = False, **kwargs) -> Edited:
    """``fills`` edits of each image (image i's are rows i * fills ... of the result),
    in batches; batch b draws from ``batch_generator(seed, b)`` as ``sample_many`` does,
    so with full masks and one fill they are the sample stage's images of these labels.
    Each image is encoded once."""
    device = var.scale_ids.device
    tokens = [t.repeat_interleave(fills, 0) for t in encode(tokenizer, images, batch_size)]
    masks, labels = masks.repeat_interleave(fills, 0), labels.repeat_interleave(fills)
    parts = []
    for b, ids in enumerate(torch.arange(len(labels)).split(batch_size)):
        with autocast(device, bf16):
            parts.append(edit(var, tokenizer, [t[ids] for t in tokens], masks[ids], labels[ids],
                              generator=batch_generator(seed, b, device), **kwargs))
    return Edited(torch.cat([p.images for p in parts]),
                  [torch.cat(s) for s in zip(*(p.tokens for p in parts), strict=True)],
                  [torch.cat(s) for s in zip(*(p.unknown for p in parts), strict=True)],
                  {m: [torch.cat(s) for s in zip(*(p.maps[m] for p in parts), strict=True)]
                   for m in parts[0].maps})


def uncertainty_map(scales: list[torch.Tensor], unknown: list[torch.Tensor]) -> torch.Tensor:
    """The uncertainty map of the fill (N, p_K, p_K) over the masked region (the cells
    sampled at the finest scale; NaN elsewhere): at each location, the mean over scales
    of the recorded uncertainty of the sampled cell covering it (each scale's map
    upsampled by nearest neighbour; forced cells are left out)."""
    side = scales[-1].shape[-1]
    layers = []
    for values, sampled in zip(scales, unknown, strict=True):
        kept = torch.where(sampled.to(values.device), values.float(), torch.nan)
        layers.append(F.interpolate(kept[:, None], size=(side, side), mode="nearest")[:, 0])
    region = unknown[-1].to(scales[-1].device)
    return torch.where(region, torch.stack(layers).nanmean(0), torch.nan)
