"""Prepared images and token caches on disk: written incrementally, read memory-mapped.

ImageNet's train split is ~250 GB of uint8 pixels at 256 px, so no stage may
hold a split in RAM. Arrays are .npy files (readable by any numpy program):
:class:`ArrayWriter` fills one a block of rows at a time, :class:`DiskArray`
maps it for each read and unmaps it afterwards, so a stage's resident memory
is one batch, not the dataset, however many images there are.

Layout of ``data/prepared``: ``images.npy`` (N, C, S, S) holds every listed
image in source order (a row of an unreadable file stays zero and is in no
split), ``labels.npy`` (N,) their classes, ``<split>.npy`` the sorted row
numbers of each split, ``classes.json`` the class names. ``data/tokens``:
``<split>.npy`` (n, L) code indices, ``<split>-labels.npy`` (n,) and
``meta.json`` (classes, patch_nums). The names come from up/core/paths.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from up.core import paths
from up.core.errors import StageError
from up.core.io import atomic_path, save_json

SPLITS = ("train", "val", "test")


class ArrayWriter:
    """A .npy file of known shape, filled block by block.

    ``numpy.lib.format.open_memmap`` creates the file; each block is written
    through its own short-lived mapping, so written pages leave the process
    (they go to the page cache and disk) instead of accumulating in its RSS.
    Use through :func:`array_writer`, which renames the file into place only
    when every row is written.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype):
        header = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self.offset = header.offset
        del header

    def write(self, start: int, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        if start < 0 or start + len(rows) > self.shape[0]:
            raise IndexError(f"rows {start}..{start + len(rows)} outside {self.shape[0]}")
        row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        block = np.memmap(self.path, dtype=self.dtype, mode="r+", shape=(len(rows), *self.shape[1:]),
                          offset=self.offset + start * row_bytes)
        block[:] = rows
        block.flush()
        del block


@contextmanager
def array_writer(path: str | Path, shape: tuple[int, ...], dtype) -> Iterator[ArrayWriter]:
    """An :class:`ArrayWriter` on a temp file that becomes ``path`` on success."""
    with atomic_path(path) as tmp:
        yield ArrayWriter(tmp, tuple(int(s) for s in shape), np.dtype(dtype))


class DiskArray:
    """Rows of a .npy file, read through a mapping opened per read.

    ``array[ids]`` (LongTensor / ndarray of row numbers, any order) or
    ``array[start:stop]`` returns a torch tensor copy; ``rows`` restricts the
    array to a subset (a split) without copying anything.
    """

    def __init__(self, path: str | Path, stage: str, rows: np.ndarray | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise _missing(self.path, "array", stage)
        try:
            mapped = np.load(self.path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise _corrupt(self.path, "array", stage, exc) from None
        self.dtype, self.full_shape, self.offset = mapped.dtype, mapped.shape, mapped.offset
        del mapped
        self.rows = rows

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.full_shape[1:])

    def __len__(self) -> int:
        return self.full_shape[0] if self.rows is None else len(self.rows)

    def subset(self, rows: np.ndarray) -> DiskArray:
        view = DiskArray.__new__(DiskArray)
        view.__dict__.update(self.__dict__)
        view.rows = np.asarray(rows, dtype=np.int64) if self.rows is None else self.rows[rows]
        return view

    def _row_numbers(self, key) -> np.ndarray:
        if isinstance(key, slice):
            ids = np.arange(len(self))[key]
        else:
            ids = np.asarray(key.cpu() if isinstance(key, torch.Tensor) else key, dtype=np.int64)
            if ids.ndim != 1:
                raise IndexError(f"index rows with a 1-d index, got shape {ids.shape}")
            if len(ids) and (ids.min() < -len(self) or ids.max() >= len(self)):
                raise IndexError(f"row index out of range for {len(self)} rows of {self.path}")
            ids = ids % max(len(self), 1)
        return ids if self.rows is None else self.rows[ids]

    def __getitem__(self, key) -> torch.Tensor:
        rows = self._row_numbers(key)
        order = np.argsort(rows, kind="stable")  # read in file order, return in asked order
        mapped = np.memmap(self.path, dtype=self.dtype, mode="r", shape=self.full_shape,
                           offset=self.offset)
        try:
            picked = np.empty((len(rows), *self.full_shape[1:]), dtype=self.dtype)
            picked[order] = mapped[rows[order]]
        finally:
            del mapped
        return torch.from_numpy(picked)

    def chunks(self, size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, rows[start:start + size]) in order: streaming over a split."""
        for start in range(0, len(self), size):
            yield start, self[start:start + size]


# --------------------------------------------------------------------------
# Prepared image splits


@dataclass
class ImageSplit:
    images: DiskArray  # uint8 (n, C, S, S), read batch by batch
    labels: torch.Tensor  # int64 (n,)
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def _missing(path: Path, what: str, stage: str) -> StageError:
    return StageError(f"{what} not found: {path} (run the {stage} stage first)")


def _corrupt(path: Path, what: str, stage: str, exc: Exception) -> StageError:
    return StageError(f"{what} {path} is unreadable or corrupt ({exc}); rerun the {stage} stage")


def _read_json(path: Path, what: str, stage: str):
    if not path.is_file():
        raise _missing(path, what, stage)
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise _corrupt(path, what, stage, exc) from None


def _load_npy(path: Path, what: str, stage: str) -> np.ndarray:
    if not path.is_file():
        raise _missing(path, what, stage)
    try:
        return np.load(path)
    except (ValueError, OSError) as exc:
        raise _corrupt(path, what, stage, exc) from None


def load_image_split(root: str | Path, name: str) -> ImageSplit:
    """One split of the prepared images (``data/prepared``), memory-mapped."""
    root = Path(root)
    rows = _load_npy(paths.split(root, name), f"prepared {name} split", "prepare")
    labels = torch.from_numpy(_load_npy(root / paths.LABELS, "prepared labels", "prepare")[rows])
    classes = _read_json(root / paths.CLASSES, "prepared class list", "prepare")
    return ImageSplit(DiskArray(root / paths.IMAGES, "prepare").subset(rows), labels, classes)


def save_split_index(root: str | Path, splits: dict[str, np.ndarray], labels: np.ndarray,
                     classes: list[str]) -> None:
    """Everything of ``data/prepared`` but ``images.npy`` (written by an ArrayWriter)."""
    root = Path(root)
    for name, rows in splits.items():
        _save_npy(paths.split(root, name), np.asarray(rows, dtype=np.int64))
    _save_npy(root / paths.LABELS, np.asarray(labels, dtype=np.int64))
    save_json(classes, root / paths.CLASSES)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


# --------------------------------------------------------------------------
# Token caches


def save_token_meta(root: str | Path, classes: list[str], patch_nums: list[int]) -> None:
    save_json({"classes": classes, "patch_nums": list(patch_nums)}, Path(root) / paths.TOKEN_META)


def save_token_labels(root: str | Path, name: str, labels: torch.Tensor) -> None:
    _save_npy(paths.token_labels(root, name), labels.numpy().astype(np.int64))


def token_path(root: str | Path, name: str) -> Path:
    return paths.split(root, name)


@dataclass
class TokenArrays:
    indices: torch.Tensor  # (n, L), a copy-on-write mapping of the file: shared by every rank
    labels: torch.Tensor  # int64 (n,)
    classes: list[str]
    patch_nums: list[int]


def load_token_arrays(root: str | Path, name: str) -> TokenArrays:
    """A token split as tensors backed by a memory map of the cache file.

    Copy-on-write mode makes the tensor writable for torch without ever
    writing the file; pages are read on demand and shared through the page
    cache by every process that maps the file (DDP ranks hold no copies).
    """
    root = Path(root)
    path = token_path(root, name)
    if not path.is_file():
        raise _missing(path, "token cache", "tokenize")
    try:
        indices = torch.from_numpy(np.load(path, mmap_mode="c"))
    except (ValueError, OSError) as exc:
        raise _corrupt(path, "token cache", "tokenize", exc) from None
    labels = torch.from_numpy(_load_npy(paths.token_labels(root, name), "token labels", "tokenize"))
    meta = _read_json(root / paths.TOKEN_META, "token cache description", "tokenize")
    if len(labels) != len(indices):
        raise StageError(f"{path} has {len(indices)} rows but {len(labels)} labels; rerun the "
                         "tokenize stage")
    return TokenArrays(indices, labels, list(meta["classes"]), list(meta["patch_nums"]))
