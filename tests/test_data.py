import hashlib

import pytest
import torch
from PIL import Image

from tests.project import copy_project, run
from up.data import conform, load_imagefolder, load_source, stratified_split
from up.errors import StageError


@pytest.mark.parametrize("source, n, side", [("mnist5k", 5000, 28), ("digits", 1797, 8)])
def test_offline_sources(source, n, side):
    raw = load_source(source)
    assert len(raw.images) == n == len(raw.labels)
    assert raw.images[0].shape == (1, side, side) and raw.images[0].dtype == torch.uint8
    assert raw.classes == [str(d) for d in range(10)]
    stacked = torch.stack(raw.images)
    assert stacked.max() == 255 and stacked.min() == 0
    counts = torch.bincount(raw.labels)
    if source == "mnist5k":
        assert counts.tolist() == [500] * 10


def test_conform_pad_resize_and_channels():
    img = torch.full((1, 28, 28), 200, dtype=torch.uint8)
    padded = conform(img, 1, 32, "pad")
    assert padded.shape == (1, 32, 32)
    assert padded[:, 2:30, 2:30].eq(200).all() and padded[:, :2].eq(0).all()
    rgb = conform(img, 3, 16, "resize")
    assert rgb.shape == (3, 16, 16) and rgb.dtype == torch.uint8
    gray = conform(torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 4, 4),
                   1, 4, "pad")
    assert gray.unique().tolist() == [76]  # 0.299 * 255


def test_stratified_split_sizes_and_balance():
    labels = torch.arange(10).repeat_interleave(500)
    splits = stratified_split(labels, 0.1, 0.1, seed=3)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [4000, 500, 500]
    for index in splits.values():
        assert torch.bincount(labels[index]).unique().numel() == 1
    union = torch.cat(list(splits.values()))
    assert union.unique().numel() == 5000
    again = stratified_split(labels, 0.1, 0.1, seed=3)
    assert all(torch.equal(splits[k], again[k]) for k in splits)
    other = stratified_split(labels, 0.1, 0.1, seed=4)
    assert not torch.equal(splits["test"], other["test"])


def _write_png(path, value):
    Image.fromarray((torch.full((6, 5, 3), value, dtype=torch.uint8)).numpy()).save(path)


def test_imagefolder_reports_and_skips_bad_files(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            _write_png(tmp_path / cls / f"{i}.png", 40 * i)
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    raw = load_imagefolder(tmp_path)
    assert raw.classes == ["cat", "dog"]
    assert len(raw.images) == 6 and raw.labels.tolist() == [0, 0, 0, 1, 1, 1]
    skipped = sorted(entry["path"] for entry in raw.skipped)
    assert skipped == [str(tmp_path / "cat" / "broken.png"), str(tmp_path / "dog" / "notes.txt")]


def test_imagefolder_empty_class_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    _write_png(tmp_path / "a" / "x.png", 1)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "junk.txt").write_text("x")
    with pytest.raises(StageError, match="no readable image"):
        load_imagefolder(tmp_path)
    with pytest.raises(StageError, match="no class sub-folders"):
        load_imagefolder(tmp_path / "a")


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("*.pt"))}


def test_prepare_stage_is_byte_reproducible(tmp_path):
    a = copy_project(tmp_path / "a", {"data": {"source": "digits", "image_size": 16}})
    run(["up", "prepare"], a)
    first = _digest(a / "data/prepared")
    run(["up", "prepare"], a)
    assert _digest(a / "data/prepared") == first and len(first) == 3
    split = torch.load(a / "data/prepared/train.pt")
    assert split["images"].shape[1:] == (1, 16, 16) and split["images"].dtype == torch.uint8
    assert split["labels"].dtype == torch.int64 and split["classes"][3] == "3"
    assert (a / "plots/prepare/preview.png").stat().st_size > 0
