import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pydantic import ValidationError

from tests.project import copy_project, params_from_yaml, run
from up.core.errors import StageError
from up.core.params import ParamsError
from up.data.sources import (
    conform,
    decoded,
    load_imagefolder,
    load_source,
    read_image,
    select_classes,
    stratified_split,
)
from up.data.splits import DiskArray, array_writer, load_image_split


@pytest.mark.parametrize("source, n, side", [("mnist5k", 5000, 28), ("digits", 1797, 8)])
def test_offline_sources(source, n, side):
    data = params_from_yaml(data={"source": source}).data
    raw = load_source(data.source, data.root, data.download)
    assert len(raw.items) == n == len(raw.labels)
    assert raw.items[0].shape == (1, side, side) and raw.items[0].dtype == torch.uint8
    assert raw.classes == [str(d) for d in range(10)]
    stacked = torch.stack(raw.items)
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


def _bad_folder(root):
    """Two classes of three PNGs each, plus a corrupt PNG and a text file."""
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            _write_png(root / cls / f"{i}.png", 40 * i)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_imagefolder_reports_and_skips_bad_files(tmp_path, workers):
    raw = load_imagefolder(_bad_folder(tmp_path))
    assert raw.classes == ["cat", "dog"]
    assert len(raw.items) == 8 and raw.labels.tolist() == [0] * 4 + [1] * 4
    results = list(decoded(raw, 3, 8, "pad", workers=workers, window=3))
    assert [number for number, _, _ in results] == list(range(8))
    skipped = [raw.items[n].name for n, image, _ in results if image is None]
    assert skipped == ["broken.png", "notes.txt"]
    assert all(reason is None for _, image, reason in results if image is not None)
    assert all(image.shape == (3, 8, 8) for _, image, _ in results if image is not None)


def test_imagefolder_empty_class_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    _write_png(tmp_path / "a" / "x.png", 1)
    (tmp_path / "b").mkdir()
    with pytest.raises(StageError, match="no image file"):
        load_imagefolder(tmp_path)
    with pytest.raises(StageError, match="no class sub-folders"):
        load_imagefolder(tmp_path / "a")


def test_prepare_stage_names_a_class_without_readable_images(tmp_path):
    data = tmp_path / "images"
    (data / "a").mkdir(parents=True)
    for i in range(4):
        _write_png(data / "a" / f"{i}.png", i)
    (data / "b").mkdir()
    (data / "b" / "junk.txt").write_text("x")
    project = copy_project(tmp_path / "p", {"data": {"source": "imagefolder", "root": str(data),
                                                     "channels": 3, "image_size": 8}})
    done = run(["up", "prepare"], project, check=False)
    assert done.returncode == 1 and "class 'b' has no readable image" in done.stderr


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("*.npy"))}


def test_prepare_stage_is_byte_reproducible(tmp_path):
    a = copy_project(tmp_path / "a", {"data": {"source": "digits", "image_size": 16}})
    run(["up", "prepare"], a)
    first = _digest(a / "data/prepared")
    run(["up", "prepare"], a)
    assert _digest(a / "data/prepared") == first and len(first) == 5
    split = load_image_split(a / "data/prepared", "train")
    assert split.images.shape[1:] == (1, 16, 16) and split.images[:3].dtype == torch.uint8
    assert split.labels.dtype == torch.int64 and split.classes[3] == "3"
    assert (a / "plots/prepare/preview.png").stat().st_size > 0


def test_memory_mapped_prepare_equals_in_memory_result(tmp_path):
    """The streamed, memory-mapped splits hold bit for bit what stacking every decoded
    image in memory and indexing it by the split gives; bad files are listed, not used."""
    folder = _bad_folder(tmp_path / "images")
    for cls in ("cat", "dog"):  # varied sizes and content: resizing must agree too
        for i in range(3, 12):
            pixels = torch.randint(0, 256, (7 + i, 9 + 2 * i, 3), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(i + len(cls)))
            Image.fromarray(pixels.numpy()).save(folder / cls / f"{i}.png")
    cfg = {"source": "imagefolder", "root": str(folder), "channels": 3, "image_size": 12,
           "fit": "resize", "val_fraction": 0.2, "test_fraction": 0.2, "workers": 2}
    project = copy_project(tmp_path / "p", {"data": cfg})
    run(["up", "prepare"], project)

    raw = load_imagefolder(folder)
    kept, images = [], []
    for number, path in enumerate(raw.items):
        try:
            image = read_image(path)
        except (OSError, ValueError):
            continue
        kept.append(number)
        images.append(conform(image, 3, 12, "resize"))
    images, labels = torch.stack(images), raw.labels[kept]
    splits = stratified_split(labels, 0.2, 0.2, seed=0)
    for name, index in splits.items():
        split = load_image_split(project / "data/prepared", name)
        assert torch.equal(split.images[:], images[index]), name
        assert torch.equal(split.labels, labels[index]) and split.classes == ["cat", "dog"]
    skipped = json.loads((project / "data/prepared/skipped.json").read_text())
    assert sorted(Path(e["path"]).name for e in skipped) == ["broken.png", "notes.txt"]


def test_disk_array_reads_rows_in_any_order(tmp_path):
    rows = torch.arange(6 * 4, dtype=torch.int16).view(6, 4)
    with array_writer(tmp_path / "a.npy", (6, 4), np.int16) as out:
        out.write(4, rows[4:].numpy())  # blocks in any order
        out.write(0, rows[:4].numpy())
    array = DiskArray(tmp_path / "a.npy", "test")
    assert array.shape == (6, 4) and torch.equal(array[:], rows)
    assert torch.equal(array[torch.tensor([5, 0, 5, 2])], rows[[5, 0, 5, 2]])
    view = array.subset(np.array([1, 3, 5]))
    assert len(view) == 3 and torch.equal(view[[2, 0]], rows[[5, 1]])
    assert torch.equal(view[1:], rows[[3, 5]])
    with pytest.raises(IndexError):
        view[[3]]


def test_interrupted_array_writer_leaves_no_file(tmp_path):
    with pytest.raises(KeyboardInterrupt), array_writer(tmp_path / "a.npy", (4, 2), np.uint8) as out:
        out.write(0, np.ones((2, 2), dtype=np.uint8))
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


# -- data.classes: a subset of the classes ---------------------------------------------

ANIMALS = ("ant", "bee", "cat", "dog", "eel", "fox")


def _animal_folder(root, per_class=3):
    """Six classes of ``per_class`` PNGs; each image's value tells its class."""
    for c, name in enumerate(ANIMALS):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            _write_png(root / name / f"{i}.png", 40 * c + i)
    return root


def _pixel_classes(raw):
    """The class each listed file's pixels say it belongs to."""
    return [ANIMALS[int(read_image(path)[0, 0, 0]) // 40] for path in raw.items]


def test_classes_by_name_keep_the_folder_order(tmp_path):
    root = _animal_folder(tmp_path / "images")
    raw = load_source("imagefolder", root, False, ["fox", "bee", "dog"], seed=0)
    assert raw.classes == ["bee", "dog", "fox"]  # the folder order, not the list's
    assert raw.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert _pixel_classes(raw) == [raw.classes[label] for label in raw.labels.tolist()]
    everything = load_source("imagefolder", root, False, None, seed=0)
    assert everything.classes == list(ANIMALS) and len(everything.items) == 18


def test_classes_from_a_file_read_from_the_project_root(tmp_path, monkeypatch):
    root = _animal_folder(tmp_path / "images")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "three.txt").write_text("# a comment\nfox\n\n  bee  \ndog\n")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    by_file = load_source("imagefolder", root, False, "lists/three.txt", seed=0)
    by_name = load_source("imagefolder", root, False, ["fox", "bee", "dog"], seed=0)
    assert by_file.classes == by_name.classes and by_file.items == by_name.items
    assert torch.equal(by_file.labels, by_name.labels)
    (tmp_path / "lists" / "twice.txt").write_text("fox\nbee\nfox\n")
    for name, says in [("missing.txt", "cannot read the file"), ("twice.txt", "'fox' listed more")]:
        with pytest.raises(ParamsError, match=says) as err:
            load_source("imagefolder", root, False, f"lists/{name}", seed=0)
        assert len(err.value.lines) == 1 and "data.classes" in err.value.lines[0]


def test_classes_by_count_are_drawn_with_the_seed(tmp_path):
    root = _animal_folder(tmp_path / "images")
    drawn = {seed: load_source("imagefolder", root, False, 3, seed=seed).classes for seed in range(6)}
    assert all(len(c) == 3 and c == sorted(c) and set(c) <= set(ANIMALS) for c in drawn.values())
    assert load_source("imagefolder", root, False, 3, seed=4).classes == drawn[4]  # deterministic
    assert len({tuple(c) for c in drawn.values()}) > 1  # and a function of the seed
    assert select_classes(list(ANIMALS), 6, 0, "x") == list(range(6))
    with pytest.raises(ParamsError, match="has 6 classes"):
        select_classes(list(ANIMALS), 7, 0, "x")


def test_classes_of_an_in_memory_source(tmp_path):
    """Every source selects: digits' classes are named 0..9 (YAML numbers are names too)."""
    data = params_from_yaml(data={"source": "digits", "classes": [7, 3]}).data
    assert data.classes == ["7", "3"]
    raw = load_source(data.source, data.root, data.download, data.classes, seed=0)
    full = load_source("digits", data.root, False)
    assert raw.classes == ["3", "7"] and set(raw.labels.tolist()) == {0, 1}
    kept = torch.nonzero((full.labels == 3) | (full.labels == 7)).flatten().tolist()
    assert all(torch.equal(raw.items[i], full.items[k]) for i, k in enumerate(kept))
    assert torch.equal(raw.labels, (full.labels[kept] == 7).long())
    assert load_source("digits", data.root, False, 4, seed=1).classes == \
        [full.classes[i] for i in select_classes(full.classes, 4, 1, "digits")]


@pytest.mark.parametrize("value, says", [
    (1, "at least 2"), (True, "a count, a list"), (["cat"], "at least 2"),
    (["cat", "cat", "dog"], "more than once"), (["cat", " "], "blank class name"),
    ("", "empty file path"), (2.5, "classes"),
])
def test_bad_class_selections_are_params_errors(value, says):
    with pytest.raises(ValidationError, match=says):
        params_from_yaml(data={"classes": value})


def test_prepare_stage_with_a_missing_class_writes_nothing(tmp_path):
    """A class the folder lacks: one line naming it, exit 2 (a parameter error), nothing
    written; fixed, the stage records the classes it kept."""
    root = _animal_folder(tmp_path / "images")
    project = copy_project(tmp_path / "p", {"data": {
        "source": "imagefolder", "root": str(root), "channels": 3, "image_size": 8, "fit": "resize",
        "preview_per_class": 2, "classes": ["dog", "zebra", "ant", "yak"]}})
    done = run(["up", "prepare"], project, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "error: params.yaml: data.classes = ['dog', 'zebra', 'ant', 'yak']: class 'zebra' (and 1 "
        f"more of the 4) is not a class of imagefolder {root}"]
    assert not any((project / d).exists() for d in ("data", "metrics", "plots/prepare"))

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["classes"] = ["dog", "ant"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["up", "prepare"], project)
    prepared = project / "data/prepared"
    assert json.loads((prepared / "classes.json").read_text()) == ["ant", "dog"]
    assert json.loads((prepared / "params.json").read_text())["classes"] == ["dog", "ant"]
    assert json.loads((project / "metrics/prepare.json").read_text())["classes"] == 2
    train = load_image_split(prepared, "train")
    assert train.classes == ["ant", "dog"] and set(train.labels.tolist()) == {0, 1}
    assert set((train.images[:][:, 0, 0, 0] // 40).tolist()) == {0, 3}  # ant's and dog's pixels


def test_prepare_record_has_no_classes_key_when_all_are_used(tmp_path):
    """data.classes: null leaves data/prepared as it was before the key existed."""
    project = copy_project(tmp_path / "p", {"data": {"source": "digits", "image_size": 8}})
    run(["up", "prepare"], project)
    assert "classes" not in json.loads((project / "data/prepared/params.json").read_text())
