"""`up import-var` / `up export-var`: VAR's released checkpoints in and out.

Import turns VAR's VQ-VAE and transformer state dicts into the project's
``models/tokenizer.pt`` (with the codebook clusters semantic entropy needs)
and a ``models/var-*.pt`` checkpoint in the format training writes, so that
sampling, evaluation and fine-tuning (``train.init_from``) use them like any
model trained here. Export writes the reverse: plain state dicts under VAR's
key names that VAR's own code and demo notebook load with
``load_state_dict(..., strict=True)``.

``--class-rows`` imports the transformer for a subset of its classes (e.g.
VAR-d16 for ImageNet-100 or AFHQ): the class embedding keeps the chosen rows,
in the fine-tuning data's label order, and the null row (`select_class_rows`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from up.core import paths
from up.core.errors import StageError
from up.core.io import load_torch, save_torch
from up.core.params import Params
from up.models.interop import (
    check_class_rows,
    check_pair,
    export_vae,
    export_var,
    import_vae,
    import_var,
    select_class_rows,
)
from up.models.tokenizer import load_tokenizer
from up.models.transformer import load_var_and_temperatures
from up.training.tokenizer import cluster_codebook


def load_state_dict(path: Path, what: str) -> Mapping[str, torch.Tensor]:
    """A released ``.pth`` (a flat state dict), loaded without running pickled code."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise StageError(f"{what} {path} is not a readable torch state dict: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise StageError(f"{what} {path} is not a flat state dict (key -> tensor)")
    return state


def _spec_entries(spec: str) -> tuple[str, list[str]]:
    """(how to name the spec in errors, its entries): a file's lines (``#`` starts
    a comment, blank lines skipped) if ``spec`` is a file, else its comma-separated
    items."""
    file = Path(spec)
    if file.is_file():
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise StageError(f"--class-rows {spec}: cannot read the file ({exc})") from None
        entries = [line.split("#", 1)[0].strip() for line in lines]
        return f"file {spec}", [e for e in entries if e]
    if "," not in spec and ("/" in spec or "\\" in spec or file.suffix in (".txt", ".csv")):
        raise StageError(f"--class-rows {spec}: no such file (give a file or comma-separated "
                         f"class indices)")
    return repr(spec), [e.strip() for e in spec.split(",") if e.strip()]


def imagenet_class_index(root: Path) -> list[str]:
    """ImageNet's class order: the sorted names of ``root``'s sub-folders (as
    torchvision's ImageFolder, VAR's training and our imagefolder source number them)."""
    if not root.is_dir():
        raise StageError(f"--imagenet-root {root} is not a folder")
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def parse_class_rows(spec: str, imagenet_root: Path | None, classes: int) -> list[int]:
    """The class-embedding rows ``--class-rows`` names, label 0 first.

    Without ``imagenet_root`` the entries are class indices 0..classes-1 in our
    label order (label i = row ``spec[i]``). With it they are class folder names
    (WordNet IDs), each mapped to its position among ``imagenet_root``'s sorted
    sub-folders; as in ``data.classes``, our labels follow that sorted order
    whatever the order of the list, so the rows come out ascending.
    """
    where, entries = _spec_entries(spec)
    if not entries:
        raise StageError(f"--class-rows {where}: no class rows given")
    if imagenet_root is None:
        rows = []
        for entry in entries:
            try:
                rows.append(int(entry))
            except ValueError:
                raise StageError(f"--class-rows {where}: {entry!r} is not an integer class index "
                                 f"(class names such as WordNet IDs need --imagenet-root)") from None
        return check_class_rows(rows, classes)
    folders = imagenet_class_index(imagenet_root)
    if len(folders) != classes:
        raise StageError(f"--imagenet-root {imagenet_root} has {len(folders)} class folders, the "
                         f"class embedding {classes} classes: their sorted order would not be its rows")
    index = {name: i for i, name in enumerate(folders)}
    seen: set[str] = set()
    for name in entries:
        if name not in index:
            raise StageError(f"--class-rows {where}: class {name!r} is not a folder of "
                             f"--imagenet-root {imagenet_root}")
        if name in seen:
            raise StageError(f"--class-rows {where}: class {name!r} is listed more than once")
        seen.add(name)
    return sorted(index[name] for name in entries)


def import_checkpoints(params: Params, vae: Path | None, var: Path | None,
                       tokenizer_out: Path, var_out: Path | None,
                       clusters: int | None, class_rows: str | None = None,
                       imagenet_root: Path | None = None) -> list[Path]:
    """Write our tokenizer and/or transformer checkpoints from VAR's files; with
    ``class_rows`` the transformer keeps only those classes (`parse_class_rows`)."""
    if vae is None and var is None:
        raise StageError("give --vae, --var or both")
    if class_rows is None and imagenet_root is not None:
        raise StageError("--imagenet-root only maps the class names of --class-rows: give both")
    if class_rows is not None and var is None:
        raise StageError("--class-rows selects the transformer's classes: give --var too")
    written = []
    transformer = rows = None
    if var is not None:
        state = load_state_dict(var, "VAR transformer")
        if class_rows is not None:
            emb = state.get("class_emb.weight")
            if emb is None or emb.dim() != 2:
                raise StageError(f"VAR transformer {var}: missing key 'class_emb.weight'")
            rows = parse_class_rows(class_rows, imagenet_root, emb.shape[0] - 1)
            state = select_class_rows(state, rows)
        transformer = import_var(state)
    if vae is not None:
        patch_nums = None if transformer is None else transformer.patch_nums
        tokenizer = import_vae(load_state_dict(vae, "VAR VQ-VAE"), patch_nums)
        if transformer is not None:
            check_pair(tokenizer, transformer)
        num_clusters = params.tokenizer.semantic_clusters if clusters is None else clusters
        if not 1 <= num_clusters <= tokenizer.vocab_size:
            raise StageError(f"{num_clusters} semantic clusters for a codebook of "
                             f"{tokenizer.vocab_size} codes (use --clusters)")
        code_to_cluster = cluster_codebook(tokenizer.quantizer.embedding.weight, num_clusters,
                                           params.seed, params.threads)
        save_torch({"config": tokenizer.config, "state_dict": tokenizer.state_dict(),
                    "code_to_cluster": code_to_cluster, "num_clusters": num_clusters,
                    "imported_from": str(vae)}, tokenizer_out)
        written.append(tokenizer_out)
    if transformer is not None:
        out = var_out or paths.imported_var(transformer.depth)
        variant = {"name": "imported", "imported_from": str(var)}
        if rows is not None:
            variant["class_rows"] = rows
            if var_out is None:  # not the full import's name
                out = out.with_name(f"{out.stem}-{len(rows)}classes{out.suffix}")
            shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
            print(f"class embedding: {len(rows)} classes, labels 0.. = rows {shown}, "
                  f"then the null row")
        save_torch({"config": transformer.config(), "state_dict": transformer.state_dict(),
                    "ema_state_dict": None, "variant": variant,
                    "temperatures": None, "logit_temperatures": None, "step": 0}, out)
        written.append(out)
    return written


def export_checkpoints(tokenizer: Path | None, checkpoint: Path | None, vae_out: Path | None,
                       var_out: Path | None, ema: bool) -> list[Path]:
    """Write VAR-format state dicts of our tokenizer and/or transformer."""
    if tokenizer is None and checkpoint is None:
        raise StageError("give --tokenizer, --checkpoint or both")
    written = []
    vq = transformer = None
    if tokenizer is not None:
        vq = load_tokenizer(tokenizer)
    if checkpoint is not None:
        load_torch(checkpoint, "VAR checkpoint")  # a clear error for a missing file
        transformer, temperatures = load_var_and_temperatures(checkpoint, ema=ema)
        if temperatures is not None:
            print(f"warning: {checkpoint} has per-scale logit temperatures "
                  f"{[round(float(t), 4) for t in temperatures]}; VAR has no such setting, "
                  f"the exported weights sample at temperature 1", file=sys.stderr)
    if vq is not None and transformer is not None:
        check_pair(vq, transformer)
    if vq is not None:
        state = export_vae(vq)
        c = vq.config
        out = vae_out or paths.exported_vae(c["base_width"], c["vocab_size"], c["latent_channels"])
        save_torch(state, out)
        written.append(out)
    if transformer is not None:
        out = var_out or paths.exported_var(transformer.depth)
        save_torch(export_var(transformer), out)
        written.append(out)
    return written


def run(params: Params, action: str, **kwargs) -> None:
    if action == "import":
        written = import_checkpoints(params, **kwargs)
    elif action == "export":
        written = export_checkpoints(**kwargs)
    else:
        raise ValueError(f"unknown interop action {action!r}")
    for path in written:
        print(f"wrote {path}")
