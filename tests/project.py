"""Run the real `up` / `dvc` commands on a copy of the project in a temp git repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from pydantic import BaseModel

from up.core.io import save_torch
from up.core.params import Params
from up.core.runtime import setup
from up.data.splits import (
    array_writer,
    save_split_index,
    save_token_labels,
    save_token_meta,
    token_path,
)
from up.models.tokenizer import MultiScaleVQVAE
from up.training.run import RunPaths, build_run, finish, train

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
    # eager: six steps are over before a compile would pay (test_train checks the compiled run)
    "train": {"steps": 6, "batch_size": 16, "warmup_steps": 2, "save_every": 3, "log_every": 2,
              "compile": False},
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


# Maps of run names, not settings: an override gives them whole (merging would add
# params.yaml's runs to the test's).
RUN_MAPS = ("variants", "derived")


def params_dict(**overrides) -> dict:
    """The repository's params.yaml with ``overrides`` deep-merged into it: the one
    way tests build params. A section may be given as a dict of some of its keys or
    as a section object; ``variants`` and ``derived`` replace params.yaml's."""
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    given = {key: value.model_dump() if isinstance(value, BaseModel) else value
             for key, value in overrides.items()}
    out = merge(base, {k: v for k, v in given.items() if k not in RUN_MAPS})
    out.update({k: v for k, v in given.items() if k in RUN_MAPS})
    return out


def params_from_yaml(**overrides) -> Params:
    """``Params`` of params.yaml with ``overrides`` (see ``params_dict``)."""
    return Params(**params_dict(**overrides))


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


# -- a tiny token project for the training-loop tests (no DVC) ---------------------

PATCH_NUMS = [1, 2, 4]
V, CLUSTERS, CLASSES = 16, 4, 3


def make_project(root, n_train=40, n_val=12):
    """A tiny tokenizer and token caches whose tokens depend on the class (learnable)."""
    torch.manual_seed(123)
    tok = MultiScaleVQVAE(in_channels=1, widths=[8], res_blocks=0, latent_channels=4,
                          vocab_size=V, patch_nums=PATCH_NUMS, phi_share=2)
    (root / "models").mkdir(exist_ok=True)
    save_torch({"config": tok.config, "state_dict": tok.state_dict(),
                "code_to_cluster": torch.arange(V) % CLUSTERS, "num_clusters": CLUSTERS},
               root / "models" / "tokenizer.pt")
    length = sum(p * p for p in PATCH_NUMS)
    for split, n in (("train", n_train), ("val", n_val)):
        labels = torch.arange(n) % CLASSES
        noise = torch.randint(0, 3, (n, length))
        indices = (labels[:, None] * 5 + torch.arange(length) + noise) % V
        save_tokens(root / "data" / "tokens", split, indices.to(torch.uint8), labels,
                    [str(c) for c in range(CLASSES)], PATCH_NUMS)
    return root


def save_prepared(root, splits: dict, classes: list[str]) -> None:
    """Prepared image splits {name: (uint8 images, labels)} in the prepare stage's layout."""
    images = torch.cat([x for x, _ in splits.values()])
    with array_writer(root / "images.npy", tuple(images.shape), np.uint8) as out:
        out.write(0, images.numpy())
    rows, start = {}, 0
    for name, (x, _) in splits.items():
        rows[name], start = np.arange(start, start + len(x)), start + len(x)
    labels = torch.cat([y for _, y in splits.values()])
    save_split_index(root, rows, labels.numpy(), classes)


def save_tokens(root, split, indices, labels, classes, patch_nums):
    """A token cache split in the tokenize stage's layout."""
    with array_writer(token_path(root, split), tuple(indices.shape), indices.numpy().dtype) as out:
        out.write(0, indices.numpy())
    save_token_labels(root, split, labels)
    save_token_meta(root, classes, patch_nums)


def tiny_params(train=None, up=None, transformer=None) -> dict:
    """Overrides of params.yaml for the tiny token project (``params_from_yaml(**...)``)."""
    return {
        "seed": 0, "threads": 1, "device": "cpu", "data": {"source": "digits"},
        "transformer": {"depth": 2, "width": 32, "heads": 2, **(transformer or {})},
        "train": {"steps": 6, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "save_every": 2,
                  "log_every": 2, "calib_fraction": 0.2, "compile": False, **(train or {})},
        "variants": {"ce": {"loss": "ce"}, "ls": {"loss": "ls", "epsilon": 0.1},
                     "up": {"loss": "up", "calib_every": 3, **(up or {})}},
        "derived": {"ce+ts": {"loss": "ts"},
                    "up_teacher": {"loss": "up", "reference": "teacher", "lambda_disp": 2.0}},
    }


def run_paths(root, checkpoint="ckpt.pt", teacher=None) -> RunPaths:
    return RunPaths(root / checkpoint, root / "data" / "tokens", root / "models" / "tokenizer.pt",
                    teacher=teacher)


def train_tiny(root, params: dict, variant="ce", checkpoint="ckpt.pt", teacher=None, threads=1):
    """build_run + train + finish, as the train stage composes them."""
    setup(0, threads)
    paths = run_paths(root, checkpoint, teacher)
    state = build_run(params_from_yaml(**params), variant, 0, paths)
    train(state, paths.checkpoint)
    return finish(state, params_from_yaml(**params))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A .pt whose unpickling would create ``marker`` (a __reduce__ payload), written by
    another process so the class is unknown here, as for a downloaded file."""
    script = (f"import torch, pathlib\nclass P:\n    def __reduce__(self):\n"
              f"        return (pathlib.Path.touch, (pathlib.Path({str(marker)!r}),))\n"
              f"torch.save({{'state_dict': P()}}, {str(path)!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True)
    return path
