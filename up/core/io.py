"""Atomic outputs: write to a temp file in the same folder, then rename.

An interrupted stage must never leave a file that looks complete, so every
output of the project goes through these helpers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o644)  # mkstemp's 0600 would make outputs private to the runner
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path``; on success it replaces ``path`` (a folder
    is whole or absent, never half-copied)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the folder private to the runner
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_with(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save through a buffer: the archive then does not embed the (random)
    temp file name, so equal objects give byte-identical files."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_with(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


def load_torch(path: str | os.PathLike, what: str = "file") -> Any:
    """torch.load with a clear error naming the missing, unreadable or unsafe file.

    ``weights_only=True``: a shared or downloaded checkpoint must never run code,
    and every file the pipeline writes holds only tensors and plain containers.

    Tensors are memory-mapped (copy-on-write): a 10 GB samples file read by
    eight evaluate ranks is paged in on use and shared, not copied eight times."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} (run the stage that produces it)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        from up.core.errors import StageError

        if "Weights only load failed" in str(exc):
            raise StageError(f"{what} {path} is refused: it holds objects other than tensors and "
                             "plain containers, which could run code on load (only weights_only "
                             "checkpoints are read)") from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StageError(f"{what} {path} is unreadable or corrupt ({first}); rerun the stage "
                         "that writes it") from exc


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return write_with(path, lambda tmp: tmp.write_text(text))


def save_text(text: str, path: str | os.PathLike) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text))


def save_tsv(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """A DVC-plots-friendly table: header from the first row's keys."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    keys = list(rows[0])
    lines = ["\t".join(keys)] + ["\t".join(str(row[k]) for k in keys) for row in rows]
    return save_text("\n".join(lines) + "\n", path)


def save_image_grid(images, path: str | os.PathLike, nrow: int, padding: int = 2) -> Path:
    """Save a uint8 (N, C, H, W) or float [0, 1] batch as one PNG grid."""
    import torch
    from torchvision.utils import save_image

    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    return write_with(path, lambda tmp: save_image(images, tmp, nrow=nrow, padding=padding,
                                                   format="png"))


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        return write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110,
                                                        bbox_inches="tight"))
    finally:
        plt.close(fig)
