"""edit@variant: in-painting, out-painting and class-conditional editing, and `up edit`.

The stage edits ``edit.images_per_class`` test images of every class (the same images
for every run: drawn with ``seed``) with each mask of ``edit.masks``, K =
``edit.fills_per_image`` fills each, conditioned on the image's class; with
``edit.class_shift`` > 0 every mask is used again with class (c + shift) mod C (class
editing). Sampling follows the ``sample`` section; every task draws from the run's
seeded batch streams (common random numbers); the shuffled-map control averages
``evaluate.random_repeats`` permutations. Outputs: metrics/edit-{run}.json (the
measures of up/evaluation/editing.py, pooled and per task; written last) and
edits/{run}/{task}.png (rows: original, masked input, the K fills, the uncertainty map
over the masked input).
One process (the launcher is not used): the edits are few.

`up edit --image FILE` (or ``--split NAME``) edits one image file or the first images
of a split with a named mask or a mask image, writing the fills, the uncertainty maps
and the grid into ``--out``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from up.core import paths
from up.core.errors import StageError
from up.core.io import atomic_dir, save_figure, save_image_grid, save_json, save_torch
from up.core.params import Params, ParamsError
from up.core.runtime import resolve_device
from up.data.sources import conform, read_image, spread_classes
from up.data.splits import load_image_split
from up.evaluation.editing import TaskInputs, figures, score_task, task_figures
from up.evaluation.evaluator import evaluator_outputs, load_evaluator
from up.evaluation.selective import per_class_subset
from up.generation.editing import (
    HALVES,
    MaskError,
    check_mask,
    edit_batches,
    encode,
    mask_from_image,
    named_mask,
    uncertainty_map,
)
from up.generation.sampler import compile_for_sampling
from up.models.tokenizer import load_code_clusters, load_tokenizer, to_uint8
from up.models.transformer import load_var_for_sampling

EVALUATOR, TOKENIZER = paths.EVALUATOR, paths.TOKENIZER
MAP_MEASURE = "entropy"  # the uncertainty the map shows (of the guided distribution)


@dataclass
class Editor:
    """A run's models and sampling settings: ``fill`` edits image sets."""

    var: torch.nn.Module
    tokenizer: torch.nn.Module
    settings: dict  # sample()'s keyword arguments
    batch_size: int
    seed: int

    @property
    def side(self) -> int:
        return self.tokenizer.latent_side * self.tokenizer.downsample

    def fill(self, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, k: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K fills of each image: (fills uint8 (N, K, C, H, W), their uncertainty maps
        (N, K, p_K, p_K), NaN outside the sampled region, the region (N, p_K, p_K))."""
        n = len(images)
        edited = edit_batches(self.var, self.tokenizer, images, masks, labels, k,
                              self.batch_size, self.seed, **self.settings)
        maps = uncertainty_map(edited.maps[MAP_MEASURE], edited.unknown)
        side = maps.shape[-1]
        return (edited.images.view(n, k, *images.shape[1:]), maps.view(n, k, side, side),
                edited.unknown[-1].view(n, k, side, side)[:, 0])

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """The tokenizer's reconstructions of uint8 ``images``."""
        device = self.var.scale_ids.device
        with torch.no_grad():
            tokens = [t.to(device) for t in encode(self.tokenizer, images, self.batch_size)]
            return to_uint8(self.tokenizer.decode(tokens)).cpu()


def editor(params: Params, variant: str, seed: int, checkpoint: Path | None = None) -> Editor:
    """The run's transformer (or ``checkpoint``), the tokenizer, the sample section's
    settings and the variant's kappa (the dispersion's evidence mass, as in sampling)."""
    sp = params.sample
    kappa = float(getattr(params.variant(variant), "kappa", 1.0))
    device = resolve_device(params.device)
    var, temperatures, at_temperatures = load_var_for_sampling(
        paths.model(variant, seed) if checkpoint is None else checkpoint, ema=True)
    code_to_cluster, num_clusters = load_code_clusters(TOKENIZER)
    settings = dict(guidance=sp.guidance, guidance_schedule=sp.guidance_schedule, top_k=sp.top_k,
                    top_p=sp.top_p, temperature=sp.temperature, draw=sp.draw,
                    scale_temperatures=temperatures,
                    sample_at_temperatures=at_temperatures, code_to_cluster=code_to_cluster,
                    num_clusters=num_clusters, kappa=kappa,
                    bf16=device.type == "cuda" and params.train.bf16)
    return Editor(compile_for_sampling(var.to(device), sp.compile), load_tokenizer(TOKENIZER, device),
                  settings, sp.batch_size, seed)


def masked_input(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """What the model is shown: the images with the masked pixels mid-grey."""
    return torch.where(masks[:, None], torch.full_like(images, 128), images)


def grid_figure(originals: torch.Tensor, masks: torch.Tensor, fills: torch.Tensor,
                maps: torch.Tensor, titles: list[str]):
    """One row per image: original, masked input, the K fills, and the uncertainty map
    (mean over the fills, nats) over the masked input."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    n, k = fills.shape[:2]
    side = originals.shape[-1]
    heat = F.interpolate(maps.nanmean(1)[:, None], size=(side, side), mode="nearest")[:, 0]
    shown = masked_input(originals, masks)
    fig, axes = plt.subplots(n, k + 3, figsize=(1.1 * (k + 3) + 0.8, 1.15 * n + 0.3),
                             squeeze=False)
    vmax = float(heat.nan_to_num(0).max()) or 1.0
    for i in range(n):
        pictures = [originals[i], shown[i], *fills[i]]
        for j, pic in enumerate(pictures):
            img = pic.permute(1, 2, 0).squeeze(-1).numpy()
            axes[i, j].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
        axes[i, -1].imshow(shown[i].float().mean(0).numpy(), cmap="gray", vmin=0, vmax=255)
        drawn = axes[i, -1].imshow(heat[i].numpy(), cmap="magma", alpha=0.7, vmin=0, vmax=vmax)
        axes[i, 0].set_ylabel(titles[i], fontsize=6)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for j, title in enumerate(["original", "masked", *(f"fill {f + 1}" for f in range(k)),
                               "uncertainty"]):
        axes[0, j].set_title(title, fontsize=7)
    fig.colorbar(drawn, ax=axes[:, -1].tolist(), fraction=0.05, pad=0.02, label="nats")
    return fig


def tasks(params: Params) -> list[tuple[str, str, int]]:
    """(task name, mask, class shift) of every edit task: each mask with the image's
    class, then with class_shift > 0 each mask again with the shifted class."""
    ep = params.edit
    names = [spec.replace(" ", "_") for spec in ep.masks]
    own = [(name, spec, 0) for name, spec in zip(names, ep.masks, strict=True)]
    shifted = [(f"{name}+class{ep.class_shift}", spec, ep.class_shift)
               for name, spec in zip(names, ep.masks, strict=True)] if ep.class_shift else []
    return own + shifted


def stage_masks(params: Params, side: int) -> dict[str, torch.Tensor]:
    """edit.masks as pixel masks; a bad one is a params error (exit 2, nothing written)."""
    masks = {}
    for spec in params.edit.masks:
        try:
            masks[spec] = check_mask(named_mask(spec, side), repr(spec))
        except MaskError as exc:
            raise ParamsError([f"params.yaml: edit.masks: {exc}"]) from None
    return masks


def run(params: Params, variant: str, seed: int, **request) -> None:
    """The edit@ stage; with ``request`` (`up edit --image/--split`), ``edit_files``."""
    if request:
        edit_files(params, variant, seed, **request)
        return
    ep, ev = params.edit, params.evaluate
    model = editor(params, variant, seed)
    masks = stage_masks(params, model.side)
    num_classes = model.var.num_classes
    if ep.class_shift and ep.class_shift % num_classes == 0:
        raise ParamsError([f"params.yaml: edit.class_shift = {ep.class_shift}: a multiple of the "
                           f"{num_classes} classes asks for the image's own class"])
    device = model.var.scale_ids.device

    test = load_image_split(paths.PREPARED, "test")
    chosen = per_class_subset(test.labels, ep.images_per_class, params.seed)
    originals, labels = test.images[chosen], test.labels[chosen]
    train = load_image_split(paths.PREPARED, "train")
    kept = per_class_subset(train.labels, ev.realism_per_class, params.seed)
    real_labels = train.labels[kept]
    fewest = int(torch.unique(real_labels, return_counts=True)[1].min())
    if fewest <= ev.realism_k:
        raise StageError(f"the training split keeps {fewest} images of its smallest class; realism "
                         f"needs more than evaluate.realism_k={ev.realism_k}")
    evaluator = load_evaluator(EVALUATOR).to(device)

    def features(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return evaluator_outputs(evaluator, images, ev.feature_batch_size, device)

    real = (features(train.images.subset(kept.numpy()))[0], real_labels)
    recon = model.reconstruct(originals)
    rows = torch.cat([torch.nonzero(labels == c).flatten()[:1]
                      for c in spread_classes(labels.unique(), ep.grid_rows).tolist()])
    units, class_edits = {}, []
    with atomic_dir(paths.edits(variant, seed)) as folder:  # whole or absent
        for name, spec, shift in tasks(params):
            pixel = masks[spec].expand(len(originals), -1, -1)
            requested = (labels + shift) % num_classes
            fills, maps, region = model.fill(originals, pixel, requested, ep.fills_per_image)
            task = TaskInputs(spec if spec in HALVES else None, fills, originals, recon, pixel,
                              requested, maps, region)
            units[name] = score_task(task, features, real, ev.realism_k, ev.random_repeats, seed)
            if shift:
                class_edits.append(name)
            titles = [f"class {labels[i]}" + (f" -> {requested[i]}" if shift else "")
                      for i in rows.tolist()]
            save_figure(grid_figure(originals[rows], pixel[rows], fills[rows], maps[rows], titles),
                        folder / paths.edit_grid(name))
            print(f"edit {paths.run_tag(variant, seed)} {name}: accuracy "
                  f"{units[name]['accuracy'].mean():.3f} ({len(originals)} images x "
                  f"{ep.fills_per_image} fills)")
    metrics = {**figures(units, class_edits, ev.bootstrap, seed),
               "tasks": {name: task_figures(u) for name, u in units.items()},
               "n_samples": len(originals) * ep.fills_per_image * len(units),
               "n_real": len(originals), "n_bootstrap": ev.bootstrap, "seed": seed,
               "feature_extractor": "evaluator", "map_measure": MAP_MEASURE}
    save_json(metrics, paths.metrics(f"edit-{paths.run_tag(variant, seed)}"))


def _file_image(path: Path, channels: int, side: int, fit: str) -> torch.Tensor:
    """One image file, conformed to the model's images (data.fit) as uint8 (C, side, side)."""
    from PIL import UnidentifiedImageError

    if not path.is_file() or path.stat().st_size == 0:
        raise StageError(f"--image {path}: not a readable image file")
    try:
        return conform(read_image(path), channels, side, fit)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise StageError(f"--image {path}: not a readable image ({type(exc).__name__})") from None


def edit_files(params: Params, variant: str, seed: int, *, image: Path | None, split: str | None,
               count: int, mask: str | None, mask_image: Path | None, label: int | None,
               fills: int | None, out: Path, checkpoint: Path | None) -> None:
    """`up edit`: an image file (``label`` required) or the first ``count`` images of a
    prepared split (their own classes unless ``label``), filled ``fills`` times (default
    edit.fills_per_image) where the mask says. Writes into ``out``: grid.png, each fill
    (fill-{image}-{k}.png) and uncertainty.pt (the maps (N, K, p_K, p_K) and the mask)."""
    if (image is None) == (split is None):
        raise StageError("give one of --image FILE and --split NAME")
    if mask is not None and mask_image is not None:
        raise StageError("give --mask or --mask-image, not both")
    k = params.edit.fills_per_image if fills is None else fills
    if k < 1:
        raise StageError(f"--fills {k}: need at least one fill")
    model = editor(params, variant, seed, checkpoint)
    side, num_classes = model.side, model.var.num_classes
    try:
        pixel = (mask_from_image(mask_image, side) if mask_image is not None
                 else named_mask(mask or "center", side))
        check_mask(pixel, str(mask_image) if mask_image is not None else repr(mask or "center"))
    except MaskError as exc:
        raise StageError(str(exc)) from None
    if image is not None:
        if label is None:
            raise StageError(f"--image {image}: give its requested class with --class")
        originals = _file_image(Path(image), model.tokenizer.config["in_channels"], side,
                                params.data.fit)[None]
        labels = torch.tensor([label])
    else:
        data = load_image_split(paths.PREPARED, split)
        n = min(count, len(data))
        originals = data.images[torch.arange(n)]
        if originals.shape[-1] != side:
            raise StageError(f"--split {split}: images of side {originals.shape[-1]}, the model's "
                             f"are {side}")
        labels = data.labels[:n] if label is None else torch.full((n,), label)
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise StageError(f"--class {label}: outside 0..{num_classes - 1}")
    pixel = pixel.expand(len(originals), -1, -1)
    filled, maps, _ = model.fill(originals, pixel, labels, k)
    out = Path(out)
    for i, per_image in enumerate(filled):
        for j, picture in enumerate(per_image):
            save_image_grid(picture[None], out / f"fill-{i}-{j}.png", nrow=1, padding=0)
    save_torch({"maps": maps, "mask": pixel[0].clone(), "labels": labels, "measure": MAP_MEASURE},
               out / paths.EDIT_UNCERTAINTY)
    titles = [f"class {c}" for c in labels.tolist()]
    save_figure(grid_figure(originals, pixel, filled, maps, titles), out / paths.GRID)
    print(f"wrote {out}: {len(originals)} image(s) x {k} fills, grid {out / paths.GRID}")
