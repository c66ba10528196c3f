"""Peak memory of `up prepare` and `up tokenize` does not grow with the data.

Builds an imagefolder of N small RGB images for N = 5k and 40k (8x apart),
runs the two stages on each (prepare with its worker pool, tokenize with a
freshly initialised tokenizer: memory, not token quality, is measured) and
prints the peak resident set size of each command (the largest of the stage
process and its workers, from wait4) and the ratio RSS(40k) / RSS(5k),
which must stay at most 1.3. Results go to bench/data_rss.md.

    python bench/data_rss.py [--sizes 5000 40000] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from measure import cpu_model, run_measured, save_report
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
UP = Path(sys.executable).parent / "up"
CLASSES = 10


def make_folder(root: Path, n: int, side: int = 32) -> None:
    """n PNGs over CLASSES folders: a class-dependent gradient plus seeded noise."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    for i in range(n):
        cls = i % CLASSES
        folder = root / f"class{cls:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = (ramp[None, :, None] * (cls + 1) / CLASSES + ramp[:, None, None] / 4)
        pixels = np.clip(base + rng.normal(0, 20, (side, side, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.png")


def make_project(dest: Path, folder: Path, workers: int) -> None:
    shutil.copy(ROOT / "params.yaml", dest / "params.yaml")  # the stages are the installed ones
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["data"].update(source="imagefolder", root=str(folder), channels=3, image_size=32,
                          workers=workers)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    code = ("from up.core.params import load_params; from up.core.io import save_torch;"
            "from up.training.tokenizer import build_tokenizer; import torch;"
            "p = load_params(); torch.manual_seed(0); m = build_tokenizer(p.tokenizer, 3);"
            "save_torch({'config': m.config, 'state_dict': m.state_dict(),"
            "'code_to_cluster': torch.zeros(m.vocab_size, dtype=torch.long),"
            "'num_clusters': 1}, 'models/tokenizer.pt')")
    subprocess.run([sys.executable, "-c", code], cwd=dest, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[5000, 40000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "data_rss.md")
    args = parser.parse_args()

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            folder, project = Path(tmp) / f"images-{n}", Path(tmp) / f"project-{n}"
            project.mkdir()
            make_folder(folder, n)
            make_project(project, folder, args.workers)
            rows[n] = {stage: run_measured([str(UP), stage], f"up {stage}", project)
                       for stage in ("prepare", "tokenize")}
            size = sum(f.stat().st_size for f in (project / "data").rglob("*") if f.is_file())
            rows[n]["data_mib"] = size / 2**20
            print(f"N={n}: " + ", ".join(f"{s} {rss:.0f} MiB ({wall:.1f} s)"
                                         for s, (wall, rss) in list(rows[n].items())[:2]))
    small, large = args.sizes
    lines = [
        "# Peak RSS of prepare and tokenize vs the number of images",
        "",
        f"`python bench/data_rss.py --sizes {small} {large} --workers {args.workers}` on "
        f"{cpu_model()} ({os.cpu_count()} cores); 32x32 RGB PNGs, {CLASSES} classes; peak RSS "
        "= max over the stage process and its decode workers (wait4).",
        "",
        "| stage | N | peak RSS MiB | wall s | written data MiB |",
        "|---|---|---|---|---|",
    ]
    for n in args.sizes:
        for stage in ("prepare", "tokenize"):
            wall, rss = rows[n][stage]
            lines.append(f"| {stage} | {n} | {rss:.0f} | {wall:.1f} | {rows[n]['data_mib']:.1f} |")
    lines.append("")
    for stage in ("prepare", "tokenize"):
        ratio = rows[large][stage][1] / rows[small][stage][1]
        verdict = "ok" if ratio <= 1.3 else "ABOVE 1.3"
        lines.append(f"- {stage}: RSS({large}) / RSS({small}) = {ratio:.3f} ({verdict})")
    print(save_report(lines, args.out))


if __name__ == "__main__":
    main()
