"""Run the real `up` / `dvc` commands on a copy of the project in a temp git repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The smallest configuration that still exercises every stage end to end.
TINY = {
    "data": {"source": "digits", "image_size": 16, "fit": "pad", "preview_per_class": 2},
    "tokenizer": {"widths": [8, 16], "latent_channels": 8, "vocab_size": 32,
                  "patch_nums": [1, 2, 4], "phi_share": 2, "semantic_clusters": 4,
                  "steps": 6, "batch_size": 16, "warmup_steps": 2, "save_every": 3,
                  "reseed_every": 2, "grid_images": 2},
    "transformer": {"depth": 1, "width": 32, "heads": 2},
    "train": {"steps": 6, "batch_size": 16, "warmup_steps": 2, "save_every": 3, "log_every": 2},
    "sample": {"n_per_class": 2, "batch_size": 10, "grid_per_class": 2},
    "evaluator": {"widths": [8, 16], "feature_dim": 16, "steps": 10, "batch_size": 32},
    "evaluate": {"kid_subset_size": 10, "kid_subsets": 5, "random_repeats": 2},
    "sweep": {"guidance": [0.5, 3.0], "n_per_class": 4},
}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and key in base else value
    return out


def env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site-cache"),
            "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


def run(cmd: list[str], cwd: Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env(cwd.parent), capture_output=True, text=True,
                            **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def copy_project(dest: Path, overrides: dict | None = None) -> Path:
    """Copy the git-visible project files to ``dest``, apply params overrides, commit."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("metrics/", "plots/", "results/")) \
                and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params = merge(params, overrides or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "test project"], dest)
    return dest
