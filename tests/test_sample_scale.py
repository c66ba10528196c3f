"""Sampling and evaluation at scale: torchrun ranks share the batches and give the files
of one process, bounded sample grids, offline Inception that fails before any work,
FID against published reference statistics."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import Dataset
from torch_fidelity import calculate_metrics
from torch_fidelity.metric_fid import fid_statistics_to_metric

from stages.sample import grid_rows, save_figures
from tests.project import (
    CLASSES,
    PATCH_NUMS,
    ROOT,
    V,
    copy_project,
    make_project,
    params_from_yaml,
    run,
)
from up.core.distributed import Dist
from up.core.errors import StageError
from up.core.io import load_torch, save_torch
from up.core.params import load_params
from up.core.sharding import map_batches
from up.data.sources import spread_classes
from up.data.splits import array_writer, save_split_index
from up.evaluation.evaluator import Evaluator, save_evaluator
from up.evaluation.fidelity import (
    FidelityConfig,
    FidelityFeatures,
    frechet_distance,
    frechet_distance_to_stats,
    image_features,
    load_reference_stats,
    quality_from_features,
)
from up.generation.sampler import batch_generator, sample
from up.models.tokenizer import load_code_clusters, load_tokenizer
from up.models.transformer import VAR

TORCHRUN = Path(sys.executable).parent / "torchrun"
SIDE = 8  # the tiny tokenizer's image side (make_project)


# -- grids ---------------------------------------------------------------------

def test_grid_classes_are_spread_over_many_classes_and_all_of_few():
    many = spread_classes(torch.arange(1000), 16)
    assert many.tolist() == [i * 1000 // 16 for i in range(16)]  # 0, 62, ..., 937
    assert len(set(many.tolist())) == 16 and many.max() > 900
    assert spread_classes(torch.arange(10), 16).tolist() == list(range(10))
    assert spread_classes(torch.tensor([3, 7, 9]), 2).tolist() == [3, 7]


def test_grid_rows_of_10_classes_are_unchanged_and_of_1000_bounded():
    labels = torch.arange(10).repeat_interleave(5)
    old = torch.cat([torch.nonzero(labels == c).flatten()[:3] for c in range(10)])
    assert torch.equal(grid_rows(labels, 16, 3), old)  # every class, first 3 of each
    labels = torch.arange(1000).repeat_interleave(4)
    chosen = grid_rows(labels, 16, 3)
    assert len(chosen) == 16 * 3
    assert labels[chosen].unique().tolist() == [i * 1000 // 16 for i in range(16)]


def test_grid_png_of_1000_classes_at_256_px_stays_openable(tmp_path):
    n_per_class, side = 2, 256
    labels = torch.arange(1000).repeat_interleave(n_per_class)
    images = torch.full((1, 3, side, side), 200, dtype=torch.uint8).expand(len(labels), -1, -1, -1)
    entropy = torch.ones(1, 16, 16).expand(len(labels), -1, -1)
    uncertainty = {"maps": {"entropy": [entropy]}, "image": {"entropy": torch.ones(len(labels))}}
    sp = params_from_yaml(sample={"n_per_class": n_per_class, "grid_per_class": 8,
                                  "grid_classes": 16}).sample
    save_figures(images, labels, uncertainty, sp, tmp_path)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (2 * (side + 2) + 2, 16 * (side + 2) + 2)  # 2 per row, 16 rows
    assert grid.size[0] * grid.size[1] < Image.MAX_IMAGE_PIXELS
    panels = Image.open(tmp_path / "uncertainty_map.png")
    assert panels.size[0] * panels.size[1] < Image.MAX_IMAGE_PIXELS


# -- batch randomness and sharding -----------------------------------------------------

def test_batch_generator_is_a_function_of_seed_and_batch():
    draw = lambda s, b: torch.rand(4, generator=batch_generator(s, b, "cpu"))  # noqa: E731
    assert torch.equal(draw(0, 3), draw(0, 3))
    assert not torch.equal(draw(0, 3), draw(0, 4))
    assert not torch.equal(draw(0, 3), draw(1, 3))


def test_map_batches_in_one_process_keeps_the_batch_order():
    calls = map_batches(lambda b, ids: (b, ids.tolist()), 7, 3, Dist(), "test")
    assert calls == [(0, [0, 1, 2]), (1, [3, 4, 5]), (2, [6])]


def _map_on_rank(rank: int, store: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=2)
    try:
        result = map_batches(lambda b, ids: (b, rank, ids.tolist()), 7, 2, Dist(rank, 2), "test")
    finally:
        torch.distributed.destroy_process_group()
    Path(f"{out}.{rank}").write_text(json.dumps(result))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_map_batches_shares_batches_round_robin_and_gathers_in_order(tmp_path):
    out = tmp_path / "result"
    torch.multiprocessing.start_processes(_map_on_rank, args=(str(tmp_path / "store"), str(out)),
                                          nprocs=2, start_method="fork")  # no re-import: fast
    assert json.loads(Path(f"{out}.0").read_text()) == [[0, 0, [0, 1]], [1, 1, [2, 3]],
                                                        [2, 0, [4, 5]], [3, 1, [6]]]
    assert json.loads(Path(f"{out}.1").read_text()) is None


# -- a tiny project: tokenizer, token caches, VAR, evaluator, test split ----------------

def tiny_project(root: Path) -> Path:
    root.mkdir()
    make_project(root)
    torch.manual_seed(5)
    var = VAR(V, 4, PATCH_NUMS, CLASSES, depth=1, width=32, heads=2)
    with torch.no_grad():  # away from the identity-like init: samples depend on class and seed
        for p in var.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    save_torch(dict(config=var.config(), state_dict=var.state_dict(), ema_state_dict=None,
                    variant={"loss": "ce"}, temperatures=None, step=1),
               root / "models" / "var-ce-s0.pt")
    save_evaluator(Evaluator(1, CLASSES, [8], 8), root / "models" / "evaluator.pt")
    # 8 test and 16 training images per class (realism: k + 1 per half of a class)
    real = torch.randint(0, 256, (24 * CLASSES, 1, SIDE, SIDE), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))
    with array_writer(root / "data/prepared/images.npy", tuple(real.shape), "uint8") as out:
        out.write(0, real.numpy())
    save_split_index(root / "data/prepared", {"test": np.arange(8 * CLASSES),
                                              "train": np.arange(8 * CLASSES, len(real))},
                     np.arange(len(real)) % CLASSES, [str(c) for c in range(CLASSES)])
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(device="cpu", threads=1)
    params["train"]["batch_size"] = 5  # 12 val items: calibration batches of 5, 5, 2
    params["sample"].update(n_per_class=5, batch_size=6, grid_per_class=2)  # batches 6, 6, 3
    params["evaluate"].update(kid_subset_size=5, kid_subsets=4, bootstrap=20, random_repeats=2)
    params["sweep"].update(guidance=[3.0, 0.5], temperatures=[1.25], temperature_variants=["ce"],
                           truncation=True, n_per_class=4)  # 12 samples: batches 6, 6
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def torchrun(root: Path, *args: str) -> None:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m",
                           "stages.cli", *args, "--variant", "ce", "--seed", "0"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def in_process(root: Path, monkeypatch, stage: str) -> None:
    import importlib

    monkeypatch.chdir(root)
    importlib.import_module(f"stages.{stage}").run(load_params(), "ce", 0)


@pytest.fixture
def projects(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    return tiny_project(tmp_path / "two"), tiny_project(tmp_path / "one")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_processes_sample_the_files_of_one(projects, monkeypatch):
    two, one = projects
    torchrun(two, "sample")
    in_process(one, monkeypatch, "sample")
    for name in ("samples.pt", "grid.png", "uncertainty_map.png", "params.json"):
        assert (two / "samples/ce-s0" / name).read_bytes() == \
            (one / "samples/ce-s0" / name).read_bytes(), name
    saved = load_torch(one / "samples/ce-s0/samples.pt")
    assert saved["images"].shape == (5 * CLASSES, 1, SIDE, SIDE)
    # batch 1 (rank 1's under torchrun) is its own stream's draw, and differs from batch 0's
    tok = load_tokenizer(one / "models/tokenizer.pt", "cpu")
    code_to_cluster, clusters = load_code_clusters(one / "models/tokenizer.pt")
    var = VAR(**load_torch(one / "models/var-ce-s0.pt")["config"])
    var.load_state_dict(load_torch(one / "models/var-ce-s0.pt")["state_dict"])
    sp = load_params().sample
    by_hand, _, _ = sample(var.eval(), tok, saved["labels"][6:12], guidance=sp.guidance,
                           guidance_schedule=sp.guidance_schedule, top_k=sp.top_k, top_p=sp.top_p,
                           temperature=sp.temperature, generator=batch_generator(0, 1, "cpu"),
                           code_to_cluster=code_to_cluster, num_clusters=clusters)
    assert torch.equal(by_hand, saved["images"][6:12])
    assert not torch.equal(saved["images"][0:6], saved["images"][6:12])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_processes_evaluate_the_figures_of_one(projects, monkeypatch):
    """Sharded features and calibration, gathered on rank 0: the metrics of one process,
    byte for byte; FID against the test split's own statistics equals the FID."""
    two, one = projects
    in_process(one, monkeypatch, "sample")
    shutil.copytree(one / "samples", two / "samples")
    config = FidelityConfig(weights_path=str(one / "models/evaluator.pt"))
    test = np.load(one / "data/prepared/images.npy")[:8 * CLASSES]  # the test split's rows
    real = FidelityFeatures(config)(torch.from_numpy(test))
    np.savez(one / "ref.npz", mu=real["fid"].double().mean(0).numpy(),
             sigma=np.cov(real["fid"].double().numpy(), rowvar=False))
    for root in (one, two):
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["evaluate"]["reference_stats"] = str(one / "ref.npz")
        (root / "params.yaml").write_text(yaml.safe_dump(params))
    torchrun(two, "evaluate")
    in_process(one, monkeypatch, "evaluate")
    for name in ("metrics/eval-ce-s0.json", "plots/eval/ce-s0/per_sample.json",
                 "plots/eval/ce-s0/reliability.json", "plots/eval/ce-s0/selective.json"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    metrics = json.loads((one / "metrics/eval-ce-s0.json").read_text())
    assert metrics["n_samples"] == 5 * CLASSES and metrics["n_real"] == 8 * CLASSES
    assert metrics["n_val_images"] == 12 and metrics["n_val_tokens"] == 12 * 21
    assert metrics["fid"] > 0
    assert metrics["fid_reference_stats"] == pytest.approx(metrics["fid"], rel=1e-6)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_processes_sweep_the_rows_of_one(projects, monkeypatch):
    two, one = projects
    torchrun(two, "sweep")
    in_process(one, monkeypatch, "sweep")
    text = (one / "metrics/sweep-ce-s0.json").read_text()
    assert (two / "metrics/sweep-ce-s0.json").read_text() == text
    rows = json.loads(text)["rows"]
    guidance = yaml.safe_load((one / "params.yaml").read_text())["sample"]["guidance"]
    assert [(r["axis"], r["guidance"], r["temperature"], r["top_k"], r["top_p"]) for r in rows] \
        == [("guidance", 0.5, 1.0, 0, 1.0), ("guidance", 3.0, 1.0, 0, 1.0),
            ("temperature", guidance, 1.25, 0, 1.0), ("truncation", guidance, 1.0, 4, 0.95)]
    assert all(r["n_samples"] == 4 * CLASSES for r in rows)
    assert len({r["fid"] for r in rows}) == len(rows)


# -- fidelity from features ---------------------------------------------------------------

class _Images(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def test_metrics_from_batched_features_equal_torch_fidelity_on_the_images(tmp_path):
    torch.manual_seed(0)
    save_evaluator(Evaluator(1, 4, [8], 8), tmp_path / "evaluator.pt")
    config = FidelityConfig(weights_path=str(tmp_path / "evaluator.pt"), kid_subset_size=20,
                            kid_subsets=5, batch_size=16)
    gen = torch.randint(0, 256, (40, 1, SIDE, SIDE), dtype=torch.uint8)
    real = torch.randint(0, 200, (50, 1, SIDE, SIDE), dtype=torch.uint8)
    net = FidelityFeatures(config)
    ours = quality_from_features(*(image_features(x, net, 16, Dist(), "f") for x in (gen, real)),
                                 config)
    theirs = calculate_metrics(input1=_Images(gen), input2=_Images(real), isc=True, fid=True,
                               kid=True, prc=True, **config.kwargs(len(gen), len(real)))
    assert ours["kid_mean"] == theirs["kernel_inception_distance_mean"]
    assert ours["kid_std"] == theirs["kernel_inception_distance_std"]
    assert ours["is_mean"] == theirs["inception_score_mean"]
    assert ours["precision"] == theirs["precision"] and ours["recall"] == theirs["recall"]
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert ours["fid"] > 1e-3


# -- FID against published statistics ----------------------------------------------------

@pytest.mark.parametrize("n, dim", [(30, 6), (5, 12)])  # more and fewer images than dimensions
def test_fid_to_reference_stats_by_hand(n, dim):
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    mu, sigma = x.mean(0), torch.cov(x.T)
    # (n < dim: sqrt of the zero eigenvalues of a rank-deficient product, ~1e-8 of the traces)
    assert abs(frechet_distance_to_stats(x, mu, sigma)) < 1e-6
    shift = torch.linspace(-1, 2, dim, dtype=torch.float64)
    assert frechet_distance_to_stats(x, mu + shift, sigma) == pytest.approx(float(shift @ shift))
    y = torch.randn(40, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    other = torch.cov(y.T)
    assert frechet_distance_to_stats(x, y.mean(0), other) == pytest.approx(frechet_distance(x, y),
                                                                          rel=1e-9)
    expected = fid_statistics_to_metric({"mu": mu.numpy(), "sigma": sigma.numpy()},
                                        {"mu": y.mean(0).numpy(), "sigma": other.numpy()}, False)
    assert frechet_distance_to_stats(x, y.mean(0), other) == pytest.approx(
        expected["frechet_inception_distance"], rel=1e-6)


def test_reference_stats_file_is_checked(tmp_path):
    good = tmp_path / "ref.npz"
    np.savez(good, mu=np.zeros(4), sigma=np.eye(4))
    mu, sigma = load_reference_stats(good, 4)
    assert mu.shape == (4,) and torch.equal(sigma, torch.eye(4, dtype=torch.float64))
    (tmp_path / "garbage.npz").write_bytes(b"not an archive")
    np.savez(tmp_path / "no_sigma.npz", mu=np.zeros(4))
    np.savez(tmp_path / "nan.npz", mu=np.full(4, np.nan), sigma=np.eye(4))
    np.save(tmp_path / "plain.npy", np.zeros(4))
    for path, dim, says in [(tmp_path / "missing.npz", 4, "not found"),
                            (tmp_path / "garbage.npz", 4, "not an .npz"),
                            (tmp_path / "no_sigma.npz", 4, "not an .npz"),
                            (tmp_path / "plain.npy", 4, "not an .npz"),
                            (tmp_path / "nan.npz", 4, "non-finite"),
                            (good, 2048, "4-d statistics but the feature extractor gives 2048-d")]:
        with pytest.raises(StageError, match=says) as err:
            load_reference_stats(path, dim)
        assert "evaluate.reference_stats" in str(err.value) and "\n" not in str(err.value)


# -- offline Inception fails before any work ----------------------------------------------

@pytest.fixture(scope="module")
def copied(tmp_path_factory):
    return copy_project(tmp_path_factory.mktemp("offline") / "project",
                        {"evaluate": {"feature_extractor": "inception-v3-compat"}})


def _set_weights(project: Path, weights, extractor="inception-v3-compat") -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"].update(feature_extractor=extractor, inception_weights=weights)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.parametrize("command", ["evaluate", "sample", "sweep"])
@pytest.mark.parametrize("weights", [None, "missing/pt_inception.pth", "models"])
def test_inception_without_local_weights_stops_at_once(copied, command, weights):
    _set_weights(copied, weights)
    start = time.perf_counter()
    done = run(["up", command, "--variant", "ce", "--seed", "0"], copied, check=False)
    elapsed = time.perf_counter() - start
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith(
        f"error: params.yaml: evaluate.inception_weights = {weights!r}: "), lines
    assert "weights-inception-2015-12-05-6726825d.pth" in lines[0]
    assert elapsed < 5.0


@pytest.mark.parametrize("extractor, weights", [("inception-v3-compat", "params.yaml"),
                                                ("evaluator", None)])
def test_usable_extractor_settings_pass_the_check(copied, monkeypatch, extractor, weights):
    """A readable weights file, or the evaluator, passes."""
    from stages.cli import _offline_inception

    _set_weights(copied, weights, extractor)
    monkeypatch.chdir(copied)
    assert _offline_inception(load_params()) == []
