"""Time every stage of the pipeline and its peak memory, one `dvc repro -s` at a time.

Usage (from the project root, after `pip install -e .`):

    python bench/pipeline.py                # force-runs every stage in dvc.yaml order
    python bench/pipeline.py --out bench/pipeline.md

Each stage runs as its own `dvc repro --single-item --force STAGE` process, so
the wall time includes DVC's own overhead (hashing, cache) and the peak RSS is
the largest resident set of any process of that stage (os.wait4 rusage).
`checkpoints/` is emptied first: a checkpoint left by an interrupted run
would make its stage resume and time only part of its work.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

from measure import run_measured, save_report

BIN = Path(sys.executable).parent


def stage_names() -> list[str]:
    out = subprocess.run([str(BIN / "dvc"), "stage", "list", "--name-only"], check=True,
                         capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def run_stage(name: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one forced stage run."""
    return run_measured([str(BIN / "dvc"), "repro", "--single-item", "--force", name],
                        f"stage {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/pipeline.md"))
    args = parser.parse_args()
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    shutil.rmtree("checkpoints", ignore_errors=True)
    rows, total = [], 0.0
    for name in stage_names():
        wall, rss = run_stage(name)
        total += wall
        rows.append((name, wall, rss))
        print(f"{name:28s} {wall:8.1f} s {rss:9.0f} MiB", flush=True)
    peak = max(rss for _, _, rss in rows)
    lines = [f"Measured {date.today()} on {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"`python bench/pipeline.py` (forced run of every stage, default params.yaml).", "",
             "| stage | wall time (s) | peak RSS (MiB) |", "|---|---:|---:|"]
    lines += [f"| {name} | {wall:.1f} | {rss:.0f} |" for name, wall, rss in rows]
    lines += [f"| **total** | **{total:.1f}** ({total / 60:.1f} min) | **{peak:.0f}** (max) |"]
    save_report(lines, args.out)
    print(f"total {total / 60:.1f} min, peak RSS {peak:.0f} MiB -> {args.out}")


if __name__ == "__main__":
    main()
