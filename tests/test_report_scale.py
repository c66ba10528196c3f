"""The report at ImageNet's class count: the grid it opens is bounded, and an
oversized one is refused from its header, before any pixel is decoded."""

import struct
import time
import zlib

import pytest
import torch
from PIL import Image

from stages.report import run
from tests.test_report import make_project
from up.core.errors import StageError
from up.core.io import save_image_grid
from up.core.params import load_params
from up.evaluation.figures import grids_figure

# What the bounded sample stage writes for 1000 classes: sample.grid_classes = 16
# rows of sample.grid_per_class = 8 images of 256 px, 2 px apart.
ROWS, PER_ROW, SIDE = 16, 8, 256
GRID_W, GRID_H = PER_ROW * (SIDE + 2) + 2, ROWS * (SIDE + 2) + 2  # 2066 x 4130


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def header_only_png(width: int, height: int) -> bytes:
    """A valid PNG header (RGB, 8 bit) claiming width x height, with no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b""))
            + _chunk(b"IEND", b""))


def bounded_grid(path) -> None:
    """One grid of the 1000-class sample stage: row r is class r's shade."""
    shades = torch.arange(ROWS, dtype=torch.uint8).repeat_interleave(PER_ROW) * 15
    images = shades.view(-1, 1, 1, 1).expand(ROWS * PER_ROW, 3, SIDE, SIDE)
    save_image_grid(images, path, nrow=PER_ROW)


def test_thousand_class_grid_renders_into_the_report(tmp_path, monkeypatch):
    make_project(tmp_path, ["ce"], [0])
    bounded_grid(tmp_path / "samples/ce-s0/grid.png")
    with Image.open(tmp_path / "samples/ce-s0/grid.png") as img:
        assert img.size == (GRID_W, GRID_H)
    monkeypatch.chdir(tmp_path)
    run(load_params())
    with Image.open(tmp_path / "results/samples.png") as img:
        img.load()
        assert img.height > 1.5 * img.width  # the grid's 2:1 portrait shape, drawn whole


def test_grids_figure_shows_every_pixel_row(tmp_path):
    """The figure holds the whole grid, not a crop: its last row is the last class's shade."""
    path = tmp_path / "grid.png"
    bounded_grid(path)
    fig = grids_figure({"up-s0": path})
    shown = fig.axes[0].images[0].get_array()
    assert shown.shape == (GRID_H, GRID_W, 3)
    assert int(shown[GRID_H - 2 - SIDE // 2, 2 + SIDE // 2, 0]) == 15 * (ROWS - 1)


@pytest.mark.parametrize("side", [20000, 10000])  # over 2x PIL's limit (its bomb error), over 1x
def test_oversized_grid_is_refused_from_its_header(tmp_path, side):
    path = tmp_path / "samples" / "ce-s0" / "grid.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(header_only_png(side, side))
    assert side * side > Image.MAX_IMAGE_PIXELS
    started = time.perf_counter()
    with pytest.raises(StageError, match=rf"{path}.*{side} x {side} px.*sample.grid_classes"):
        grids_figure({"ce-s0": path})
    assert time.perf_counter() - started < 1.0


def test_oversized_grid_stops_the_report_before_any_output(tmp_path, monkeypatch):
    make_project(tmp_path, ["ce"], [0])
    (tmp_path / "samples/ce-s0/grid.png").write_bytes(header_only_png(20000, 20000))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match="20000 x 20000 px"):
        run(load_params())
    assert not (tmp_path / "results").exists()


def test_a_file_that_is_not_a_png_is_named(tmp_path):
    path = tmp_path / "grid.png"
    path.write_bytes(b"GIF89a" + bytes(40))
    with pytest.raises(StageError, match="not a PNG"):
        grids_figure({"ce-s0": path})
