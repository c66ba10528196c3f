"""The tokenizer at scale: DDP over processes, micro-batch accumulation, augmentation,
and a resume that does not care how the run is launched."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.project import params_from_yaml, save_prepared
from tests.test_tokenizer import TINY, tiny_images
from up.core.distributed import Dist, distributed
from up.core.errors import StageError
from up.core.io import load_torch, save_torch
from up.core.params import Params
from up.core.runtime import setup
from up.models.tokenizer import to_float
from up.training.schedule import StepBatches
from up.training.tokenizer import (
    Batches,
    accumulate_gradients,
    augment_images,
    build_tokenizer,
    train_tokenizer,
)

# Everything that has to agree across processes is on: crops and flips, the
# partial decode, dead-code re-seeding (threshold 1.5 x uniform: every other
# step re-seeds), two micro-batches per process.
SCALE = TINY.model_copy(update={"augment": "crop_flip", "micro_batch": 2})
N_TRAIN, N_VAL = 24, 6


def _train(tp, checkpoint, init_seed=0, stop_at=None, ctx=Dist(), fingerprint=None):
    setup(init_seed, 1)
    model = build_tokenizer(tp, 1)
    state = train_tokenizer(model, tiny_images(N_TRAIN), tp, seed=0, checkpoint=checkpoint,
                            fingerprint=fingerprint or {"tp": tp.model_dump()}, stop_at=stop_at,
                            ctx=ctx)
    return model, state


def _assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    for name, value in a.items():
        assert torch.allclose(value, b[name], rtol=0, atol=atol), name


def _moved(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# -- augmentation -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flip", "crop_flip"])
def test_augmentation_is_a_function_of_seed_and_step_drawn_for_the_global_batch(kind):
    x = to_float(tiny_images(32))
    out = augment_images(x, kind, seed=0, step=3)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, augment_images(x.clone(), kind, seed=0, step=3))
    assert not torch.equal(out, augment_images(x, kind, seed=0, step=4))
    assert not torch.equal(out, augment_images(x, kind, seed=1, step=3))
    shards = [augment_images(x[i:i + 8], kind, 0, 3, start=i, total=32) for i in range(0, 32, 8)]
    assert torch.equal(torch.cat(shards), out)  # a shard gets its slice of the global draws


def test_augment_none_leaves_images_bitwise_unchanged():
    x = to_float(tiny_images(8))
    assert torch.equal(augment_images(x, "none", seed=0, step=3), x)


def test_flip_mirrors_an_asymmetric_image_or_leaves_it():
    ramp = torch.arange(8.0).div(7).expand(32, 1, 8, 8)  # brighter to the right
    out = augment_images(ramp, "flip", seed=0, step=0)
    flipped = torch.tensor([torch.equal(o, r.flip(-1)) for o, r in zip(out, ramp, strict=True)])
    kept = torch.tensor([torch.equal(o, r) for o, r in zip(out, ramp, strict=True)])
    assert bool((flipped | kept).all()) and 0 < int(flipped.sum()) < 32


def test_crop_flip_is_a_window_of_the_enlarged_image():
    x = to_float(tiny_images(16))
    out = augment_images(x, "crop_flip", seed=0, step=0)
    assert out.shape == x.shape and out.dtype == x.dtype and out.abs().max() <= 1
    big = F.interpolate(x, size=(9, 9), mode="bicubic", antialias=True).clamp(-1, 1)  # 8 * 1.125
    windows = [big[:, :, i:i + 8, j:j + 8] for i in (0, 1) for j in (0, 1)]
    windows += [w.flip(-1) for w in windows]
    match = torch.stack([(w - out).abs().flatten(1).amax(1) < 1e-6 for w in windows])
    assert bool(match.any(0).all())  # every image is one of the 8 crops (flipped or not)
    assert int(match.int().argmax(0).unique().numel()) > 2  # and not always the same one
    assert not torch.allclose(out, x, atol=1e-2)


# -- micro-batches, errors ----------------------------------------------------------


def test_micro_batches_accumulate_to_the_whole_batch(tmp_path):
    setup(0, 1)
    init = build_tokenizer(SCALE, 1).state_dict()
    whole, whole_state = _train(SCALE.model_copy(update={"micro_batch": 0}), tmp_path / "a.pt")
    micro, micro_state = _train(SCALE, tmp_path / "b.pt")  # 4 forwards of 2 images a step
    _assert_close(micro.state_dict(), whole.state_dict())
    assert _moved(whole.state_dict(), init) > 1e-3  # it trained
    assert micro_state.reseeded == whole_state.reseeded > 0
    assert [r["used"] for r in micro_state.curves] == [r["used"] for r in whole_state.curves]
    assert [r["loss"] for r in micro_state.curves] == pytest.approx(
        [r["loss"] for r in whole_state.curves], abs=1e-5)
    # bf16 autocast is CUDA only: on a CPU the run is bitwise the fp32 one
    fp32, _ = _train(SCALE.model_copy(update={"bf16": False}), tmp_path / "c.pt")
    assert all(torch.equal(v, fp32.state_dict()[k]) for k, v in micro.state_dict().items())


def test_accumulated_gradient_is_the_whole_batch_gradient():
    """The exact invariant: micro-batch gradients sum to the whole batch's, and the
    re-seed candidates (image-major residual rows) come out in the same order."""
    runs = []
    for micro in (8, 2):
        setup(0, 1)
        model = build_tokenizer(SCALE, 1).train()
        order = StepBatches(N_TRAIN, SCALE.batch_size, seed=0)
        batches = Batches(tiny_images(N_TRAIN), order, micro, torch.device("cpu"))
        result = accumulate_gradients(model, model, batches, 0, SCALE, 0, Dist(), True)
        runs.append(({n: p.grad for n, p in model.named_parameters()}, result))
    (whole_grads, whole), (micro_grads, micro) = runs
    for name, grad in whole_grads.items():
        assert torch.allclose(micro_grads[name], grad, rtol=1e-4, atol=1e-8), name
    assert torch.equal(micro.counts, whole.counts) and int(whole.counts.sum()) == 8 * 21
    assert whole.residuals.shape == (8 * 21, 4)  # 1 + 4 + 16 vectors per image
    assert torch.allclose(micro.residuals, whole.residuals, atol=1e-6)
    assert micro.values == pytest.approx(whole.values, abs=1e-6)


@pytest.mark.parametrize("update, world, match", [
    ({"micro_batch": 3}, 1, "tokenizer.micro_batch=3 does not divide the 8 images"),
    ({"micro_batch": 3}, 2, "tokenizer.micro_batch=3 does not divide the 4 images per process"),
    ({}, 3, "tokenizer.batch_size=8 is not divisible by the 3 processes"),
    ({"batch_size": 32}, 1, "tokenizer.batch_size=32 exceeds the 24 training images"),
])
def test_uneven_batch_splits_are_refused(tmp_path, update, world, match):
    tp = TINY.model_copy(update={"micro_batch": 0, **update})
    with pytest.raises(StageError, match=match):
        _train(tp, tmp_path / "x.pt", ctx=Dist(0, world))


# -- processes and resume -------------------------------------------------------------


def _stage_params(**tokenizer) -> Params:
    return params_from_yaml(data={"source": "mnist5k", "image_size": 8}, seed=0, threads=1,
                            tokenizer=SCALE.model_copy(update=tokenizer))


def test_fingerprint_ignores_how_the_run_is_launched(tmp_path, monkeypatch):
    from stages.tokenizer import training_fingerprint

    monkeypatch.chdir(tmp_path)  # no params.yaml here: only params.yaml's values and these
    base = training_fingerprint(_stage_params())
    launched = _stage_params(bf16=False, micro_batch=4, save_every=5).model_copy(
        update={"launcher": "torchrun --nproc_per_node=8 -m stages.cli", "threads": 7,
                "device": "cuda", "data": _stage_params().data.model_copy(update={"workers": 9})})
    assert training_fingerprint(launched) == base
    assert training_fingerprint(_stage_params(lr=1e-3)) != base
    assert training_fingerprint(_stage_params(augment="flip")) != base
    assert training_fingerprint(_stage_params().model_copy(update={"seed": 1})) != base


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, ports: list[int], root: str) -> None:
    """One torchrun-like rank: a fresh DDP training, then the stage resuming a
    checkpoint that one process wrote (with other threads, micro-batches, bf16)."""
    import stages.tokenizer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    os.chdir(root)
    # Rank 1 starts from other weights and another global RNG state: DDP broadcasts
    # rank 0's weights, and no draw may come from the global RNG.
    with distributed("cpu") as ctx:
        model, state = _train(SCALE, "fresh.pt", init_seed=3 * rank, ctx=ctx)
    save_torch({"model": model.state_dict(), "state": {"reseeded": state.reseeded, "usage": state.usage,
                                                       "curves": state.curves}}, f"fresh-{rank}.pt")

    os.environ["MASTER_PORT"] = str(ports[1])
    setup(0, 1)
    stages.tokenizer.run(_stage_params(micro_batch=1, bf16=False).model_copy(
        update={"threads": 2}))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_processes_match_one_and_resume_a_one_process_checkpoint(tmp_path, monkeypatch):
    from stages.tokenizer import CHECKPOINT, training_fingerprint

    monkeypatch.chdir(tmp_path)
    one, one_state = _train(SCALE, tmp_path / "one.pt")
    # The checkpoint of a single-process run from other initial weights (seed 7),
    # stopped after 3 of 6 steps: resuming it must end at that run's weights.
    fingerprint = training_fingerprint(_stage_params())
    seven, seven_state = _train(SCALE, tmp_path / "seven.pt", init_seed=7,
                                fingerprint=fingerprint)
    _train(SCALE, tmp_path / CHECKPOINT, init_seed=7, stop_at=3, fingerprint=fingerprint)
    assert load_torch(tmp_path / CHECKPOINT)["step"] == 3
    save_prepared(tmp_path / "data/prepared",
                  {"train": (tiny_images(N_TRAIN), torch.zeros(N_TRAIN, dtype=torch.long)),
                   "val": (tiny_images(N_VAL, seed=2), torch.zeros(N_VAL, dtype=torch.long))},
                  ["only"])

    mp.spawn(_worker, args=(2, [_free_port(), _free_port()], str(tmp_path)), nprocs=2)

    ranks = [load_torch(tmp_path / f"fresh-{r}.pt") for r in range(2)]
    for name, value in ranks[0]["model"].items():  # identical codebooks after re-seeding
        assert torch.equal(value, ranks[1]["model"][name]), name
    _assert_close(ranks[0]["model"], one.state_dict())
    fresh = ranks[0]["state"]
    assert fresh["reseeded"] == one_state.reseeded > 0
    assert torch.allclose(fresh["usage"], one_state.usage, atol=1e-5)  # usage of the global batch
    assert [r["used"] for r in fresh["curves"]] == [r["used"] for r in one_state.curves]
    assert [r["partial_k"] for r in fresh["curves"]] == [r["partial_k"] for r in one_state.curves]

    resumed = load_torch(tmp_path / "models/tokenizer.pt")["state_dict"]
    _assert_close(resumed, seven.state_dict())
    assert _moved(seven.state_dict(), one.state_dict()) > 1e-2  # the init really differs
    assert not (tmp_path / CHECKPOINT).exists()  # rank 0 finished and cleaned up
    metrics = json.loads((tmp_path / "metrics/tokenizer.json").read_text())
    assert metrics["train_steps"] == 6 and metrics["reseeded_codes"] == seven_state.reseeded
    assert metrics["images"] == N_VAL
    rows = (tmp_path / "plots/tokenizer/curves.tsv").read_text().splitlines()
    assert len(rows) == 1 + 6
