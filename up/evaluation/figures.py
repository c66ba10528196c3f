"""The project's figures: reliability diagrams, selective-generation and
risk-coverage curves, score correlations, sample grids (matplotlib, Agg).

Separate from the report's tables so that the evaluate stage, which draws
some of them, does not depend on how the report formats its tables.
"""

from __future__ import annotations

import struct
from pathlib import Path

from up.core.errors import StageError
from up.generation.scores import IMAGE_SCORES as RANKED


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability_figure(curves: dict[str, list[dict]]):
    """Reliability diagrams (top-1 confidence vs accuracy per bin), one line per label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--", label="calibrated")
    for label, bins in curves.items():
        used = [b for b in bins if b["count"] > 0]
        ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], marker="o",
                ms=3, label=label)
    ax.set(xlabel="confidence (top-1)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title="reliability of token predictions (val)")
    ax.legend(fontsize=7)
    return fig


def _score_axes(plt, n: int, sharey: bool = True):
    cols = min(n, 5)
    rows = -(-n // cols)
    # constrained layout keeps a row's panel titles clear of the axis labels above them
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.8 * rows), squeeze=False,
                             sharey=sharey, layout="constrained")
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat


def _score_panels(curves: dict[str, list[dict]], points, xlabel: str, ylabel: str,
                  invert: bool = False, **line):
    """One panel per uncertainty score present in ``curves``, one colour per label: the
    score's curve (solid) with the random (dashed) and oracle (dotted) controls;
    ``points(rows, name)`` gives the (x, y) of one curve."""
    plt = _pyplot()
    present = {r["score"] for rows in curves.values() for r in rows}
    scores = [s for s in RANKED if s in present]
    fig, axes = _score_axes(plt, len(scores))
    for ax, score in zip(axes, scores, strict=False):
        for i, (label, rows) in enumerate(curves.items()):
            for name, style in ((score, "-"), ("random", "--"), ("oracle", ":")):
                picked = sorted(points(rows, name))
                if picked:
                    xs, ys = zip(*picked, strict=True)
                    ax.plot(xs, ys, style, color=f"C{i}",
                            label=label if name == score else f"{label} {name}", **line)
        ax.set_title(f"ranked by {score}", fontsize=8)
        ax.set_xlabel(xlabel, fontsize=7)
        if invert:
            ax.invert_xaxis()
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize=5)
    return fig


def selective_figure(curves: dict[str, list[dict]], metric: str = "fid"):
    """Stratified subset ``metric`` against the kept fraction: one panel per uncertainty
    score, one line per label; the stratified random control dashed and the oracle
    dotted in every panel."""
    def points(rows, name):
        return [(r["fraction"], r[metric]) for r in rows
                if r["score"] == name and r.get(metric) is not None]

    return _score_panels(curves, points, "kept fraction per class", f"{metric} (stratified)",
                         invert=True, marker="o", ms=3)


def risk_coverage_figure(curves: dict[str, list[dict]], risk: str = "failure"):
    """Within-class risk-coverage curves (mean ``risk`` of the kept samples against the
    kept fraction of every class): one panel per uncertainty score, one line per label,
    with the random (dashed) and oracle (dotted) controls."""
    def points(rows, name):
        return [(r["coverage"], r["value"]) for r in rows
                if r["score"] == name and r["risk"] == risk]

    return _score_panels(curves, points, "coverage (kept fraction per class)",
                         f"{risk} of kept samples", lw=1)


def correlation_figure(correlations: dict, title: str = ""):
    """Heat map of the within-class Spearman correlations between the scores."""
    plt = _pyplot()
    names, matrix = correlations["scores"], correlations["spearman"]
    fig, ax = plt.subplots(figsize=(0.55 * len(names) + 2.5, 0.55 * len(names) + 1.5))
    matrix = [[float("nan") if v is None else v for v in row] for row in matrix]
    shown = ax.imshow(matrix, cmap="coolwarm", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=5)
    fig.colorbar(shown, ax=ax, fraction=0.04, label="within-class Spearman")
    ax.set_title(f"score correlations {title}".strip(), fontsize=9)
    return fig


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, the first 24 bytes of every PNG.

    PIL's Image.open also reads only the header, but it runs its own
    decompression-bomb check there (an error above 2 x MAX_IMAGE_PIXELS, only a
    warning between 1 x and 2 x, after which the pixels would be decoded), so the
    size is read here, before PIL sees the file.
    """
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise StageError(f"{path} is not a PNG file (rerun the sample stage)")
    return struct.unpack(">II", head[16:24])


def grids_figure(grids: dict[str, Path]):
    """The variants' sample grids side by side.

    Every grid's size is read from its header first: a grid over PIL's pixel
    limit (large sample.grid_classes x grid_per_class, large images) stops the
    report with what to change, instead of gigabytes of decoding or PIL's
    decompression-bomb error.
    """
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    for path in grids.values():
        width, height = _png_size(path)
        if limit is not None and width * height > limit:
            raise StageError(
                f"{path} is {width} x {height} px ({width * height / 1e6:.0f} MP), over the "
                f"{limit / 1e6:.0f} MP the report opens: lower sample.grid_classes or "
                "sample.grid_per_class and rerun the sample stage")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.6), squeeze=False)
    for ax, (label, path) in zip(axes[0], grids.items(), strict=True):
        with Image.open(path) as img:
            ax.imshow(img.convert("RGB"), interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    return fig
