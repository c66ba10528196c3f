"""One training loop for the VAR transformer, whatever the token loss.

Every variant (ce, ls, lr, up) runs through :func:`train`; only the loss
module changes. The `up` loss also needs its per-scale temperatures refitted
on held-out training tokens every ``calib_every`` steps, which the loop does.

Reproducibility: the batch of step s (StepBatches), its label dropout and the
temperature refits are pure functions of (seed, s); the checkpoint holds the
rest (weights, optimizer, EMA, temperatures, RNG, log), so a run interrupted
and resumed ends bitwise equal to an uninterrupted one on CPU.

Distribution: under torchrun every process takes a 1/world shard of each
global batch and DDP averages the gradients, so with equal shards the update
equals the single-process update on the whole batch. Rank 0 evaluates, logs
and saves.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from up.calibration import CalibrationMeter
from up.checkpoint import load_checkpoint, restore_rng, rng_state, save_checkpoint
from up.config import Params
from up.errors import StageError
from up.io import load_torch
from up.losses import TemperatureCalibrator, TokenLoss, build_token_loss
from up.runtime import progress, resolve_device
from up.schedule import StepBatches, lr_factor, set_lr
from up.tokenizer import MultiScaleVQVAE, load_code_clusters, load_tokenizer, split_indices
from up.transformer import VAR

# A split's teacher-forcing inputs are computed once and kept in memory when
# they take at most this many bytes (4,000 MNIST images: 66 MB); larger
# datasets (ImageNet: ~110 GB) rebuild them per batch on the device.
CACHE_BYTES = 2**30
ECE_BINS = 15


# --------------------------------------------------------------------------
# Data


class TeacherForcing:
    """Teacher-forcing inputs (B, L - p_1^2, C) of a token split, built by the
    frozen tokenizer from the indices alone: the encoder never runs here."""

    def __init__(self, tokenizer: MultiScaleVQVAE, indices: torch.Tensor, device: torch.device,
                 cache_bytes: int = CACHE_BYTES, chunk: int = 1024):
        self.tokenizer, self.indices, self.device, self.chunk = tokenizer, indices, device, chunk
        n, length = indices.shape
        size = n * (length - tokenizer.patch_nums[0] ** 2) * tokenizer.latent_channels * 4
        self.cache = self._build(torch.arange(n)) if size <= cache_bytes else None

    @torch.no_grad()
    def _build(self, ids: torch.Tensor) -> torch.Tensor:
        parts = []
        for chunk in ids.split(self.chunk):
            maps = split_indices(self.indices[chunk].to(self.device), self.tokenizer.patch_nums)
            parts.append(self.tokenizer.indices_to_var_input(maps))
        return torch.cat(parts)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            return self._build(ids)
        return self.cache[ids.to(self.cache.device)]


@dataclass
class TokenSplit:
    indices: torch.Tensor  # (N, L), the cache's small integer dtype
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    inputs: TeacherForcing

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, ids: torch.Tensor, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels, teacher-forcing input, target indices) of the items ``ids``."""
        return (self.labels[ids].to(device), self.inputs(ids),
                self.indices[ids].long().to(device))


def load_split(path: str | Path, tokenizer: MultiScaleVQVAE, device: torch.device,
               cache_bytes: int = CACHE_BYTES) -> TokenSplit:
    saved = load_torch(path, "token cache")
    if list(saved["patch_nums"]) != list(tokenizer.patch_nums):
        raise StageError(f"{path} was tokenized with patch_nums {list(saved['patch_nums'])}, the "
                         f"tokenizer has {list(tokenizer.patch_nums)}: rerun the tokenize stage")
    inputs = TeacherForcing(tokenizer, saved["indices"], device, cache_bytes)
    return TokenSplit(saved["indices"], saved["labels"].long(), list(saved["classes"]), inputs)


def drop_labels(labels: torch.Tensor, p: float, null_class: int, seed: int, step: int,
                rank: int = 0, world: int = 1) -> torch.Tensor:
    """Replace each label by the null class with probability ``p`` (guidance training).

    The mask is drawn for the whole global batch from (seed, step) and then
    sharded like the batch, so it depends neither on the world size nor on
    where a run was resumed.
    """
    if p == 0.0:
        return labels
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    mask = torch.rand(len(labels) * world, generator=gen) < p
    mask = mask[rank * len(labels):(rank + 1) * len(labels)].to(labels.device)
    return torch.where(mask, torch.full_like(labels, null_class), labels)


# --------------------------------------------------------------------------
# Model, optimizer, loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay only the matrices of linear layers.

    Biases, the learned q scale of qk-norm and the learned embeddings (class,
    scale, position) are not shrunk towards zero: they are offsets, gains or
    lookup tables, not maps whose norm controls the function's smoothness
    (VAR exempts its position and level embeddings likewise).
    """
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay = [p for p in model.parameters() if id(p) in matrices]
    rest = [p for p in model.parameters() if id(p) not in matrices]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0}]


def token_weights(scale_ids: torch.Tensor, kind: str) -> torch.Tensor:
    """Weight of each position (L,), summing to 1.

    ``uniform``: every token counts the same (VAR), so the finest scale
    dominates. ``per_scale``: the mean per scale, then the mean over scales.
    """
    length = scale_ids.numel()
    if kind == "uniform":
        return torch.full((length,), 1.0 / length, device=scale_ids.device)
    if kind == "per_scale":
        counts = torch.bincount(scale_ids).double()
        return (1.0 / (len(counts) * counts[scale_ids])).float()
    raise ValueError(f"unknown token weighting {kind!r}; allowed: uniform, per_scale")


def build_loss(variant, tokenizer_path: str | Path, scale_ids: torch.Tensor) -> TokenLoss:
    """The variant's token loss; `up` also gets the codebook's semantic clusters."""
    options = variant.model_dump(exclude={"loss", "calib_every", "calib_fraction"})
    context: dict[str, Any] = {}
    if variant.loss == "up":
        code_to_cluster, num_clusters = load_code_clusters(tokenizer_path)
        context = dict(code_to_cluster=code_to_cluster, num_clusters=num_clusters,
                       scale_ids=scale_ids, num_scales=int(scale_ids.max()) + 1)
    return build_token_loss(variant.loss, **context, **options)


class EMA:
    """Exponential moving average of the weights (what sampling uses when train.ema > 0)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for avg, p in zip(self.module.parameters(), model.parameters(), strict=True):
            avg.lerp_(p, 1.0 - self.decay)


# --------------------------------------------------------------------------
# Evaluation


def _autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def predict(model: VAR, split: TokenSplit, ids: torch.Tensor, batch_size: int, bf16: bool
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 logits (B, L, V), targets (B, L)) batch by batch, in eval mode
    with the true labels."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for chunk in ids.split(batch_size):
            labels, inputs, targets = split.batch(chunk, device)
            with _autocast(device, bf16):
                logits = model(labels, inputs)
            yield logits.float(), targets
    finally:
        model.train(was_training)


@dataclass
class TokenScores:
    """Per-scale sums over the evaluated tokens."""

    ce: torch.Tensor  # (K,) float64, sum of -log p(y)
    correct: torch.Tensor  # (K,) top-1 hits
    count: torch.Tensor  # (K,) tokens

    def summary(self, patch_nums) -> dict[str, Any]:
        names = [f"{p}x{p}" for p in patch_nums]
        ce, acc = self.ce / self.count, self.correct / self.count
        return {"ce": float(self.ce.sum() / self.count.sum()),
                "accuracy": float(self.correct.sum() / self.count.sum()),
                "ce_per_scale": dict(zip(names, ce.tolist(), strict=True)),
                "accuracy_per_scale": dict(zip(names, acc.tolist(), strict=True))}


def score_tokens(model: VAR, split: TokenSplit, ids: torch.Tensor, batch_size: int, bf16: bool,
                 meter: CalibrationMeter | None = None) -> TokenScores:
    """Cross-entropy and top-1 accuracy per scale; ``meter`` also gathers the
    calibration statistics, batch by batch (no (N, L, V) tensor is kept)."""
    scale_ids = model.scale_ids
    k = len(model.patch_nums)
    scores = TokenScores(*(torch.zeros(k, dtype=torch.float64, device=scale_ids.device)
                           for _ in range(3)))
    for logits, targets in predict(model, split, ids, batch_size, bf16):
        ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        hits = logits.argmax(-1) == targets
        scores.ce.index_add_(0, scale_ids, ce.sum(0).double())
        scores.correct.index_add_(0, scale_ids, hits.sum(0).double())
        scores.count.index_add_(0, scale_ids, torch.full_like(scale_ids, len(targets)).double())
        if meter is not None:
            meter.update(logits, targets)
    return scores


def fixed_subset(n: int, k: int) -> torch.Tensor:
    """k of n items drawn once with a fixed seed (the same for every run and
    variant), in order. Splits are often sorted by class: a prefix is not a sample."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return perm[:k].sort().values


def refit_temperatures(model: VAR, loss_fn: TokenLoss, calibrator: TemperatureCalibrator,
                       split: TokenSplit, ids: torch.Tensor, batch_size: int, bf16: bool) -> None:
    """Fit one temperature per scale on the held-out slice (current weights, no
    guidance dropout) and copy it into the loss's reference."""
    logits, targets = zip(*predict(model, split, ids, batch_size, bf16), strict=True)
    logits, targets = torch.cat(logits), torch.cat(targets)
    scales = model.scale_ids.expand_as(targets)
    temps = calibrator.fit(logits.flatten(0, 1), targets.flatten(), scales.flatten())
    loss_fn.temperatures.copy_(temps)


# --------------------------------------------------------------------------
# Distribution


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextmanager
def distributed(device_type: str) -> Iterator[Dist]:
    """A process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)
    when WORLD_SIZE > 1: nccl on GPUs, gloo on CPUs. A plain process gets Dist()."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Dist()
        return
    ctx = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    try:
        yield ctx
    finally:
        dist.destroy_process_group()


def _reseed_rank(seed: int, step: int, rank: int) -> None:
    """Give each rank its own random stream (drop-path masks) from (seed, step, rank)."""
    torch.manual_seed(seed * 1_000_003 + step * 1_009 + rank)


# --------------------------------------------------------------------------
# The loop


def resolved_params(params: Params, name: str, seed: int) -> dict[str, Any]:
    """Every setting that defines a training run (saved next to the model)."""
    return {"variant": name, "seed": seed, "loss": params.variant(name).model_dump(),
            "transformer": params.transformer.model_dump(), "train": params.train.model_dump(),
            "threads": params.threads, "device": params.device}


def _digest(*tensors: torch.Tensor) -> str:
    sha = hashlib.sha256()
    for t in tensors:
        sha.update(t.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


@dataclass
class TrainLog:
    """Curves and counters; part of the checkpoint so a resumed run's outputs are complete."""

    rows: list[dict[str, float]] = field(default_factory=list)
    window: dict[str, float] = field(default_factory=dict)  # sums since the last row
    window_steps: int = 0
    seconds: float = 0.0  # time spent in optimisation steps, over all resumes
    timed_steps: int = 0
    saved_step: int = 0  # step of the last checkpoint written

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.window[key] = self.window.get(key, 0.0) + value
        self.window_steps += 1

    def flush(self) -> dict[str, float]:
        means = {k: v / self.window_steps for k, v in self.window.items()}
        self.window, self.window_steps = {}, 0
        return means


@dataclass
class TrainResult:
    model: dict[str, Any]  # the models/var-*.pt content
    metrics: dict[str, Any]
    rows: list[dict[str, float]]


def _divergence(step: int, values: dict[str, float], log: TrainLog, checkpoint: Path) -> StageError:
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    kept = (f"the last good checkpoint {checkpoint} (after step {log.saved_step}) is kept; "
            "lower train.lr or raise train.warmup_steps, then rerun to resume from it"
            if log.saved_step else "no checkpoint was written yet")
    return StageError(f"non-finite {' and '.join(bad)} at step {step}: {shown}; stopped. {kept}")


def _fmt(x: float) -> float:
    return float(f"{x:.6g}")


def train(params: Params, name: str, seed: int, *, checkpoint: str | Path,
          tokens_dir: str | Path = "data/tokens", tokenizer_path: str | Path = "models/tokenizer.pt",
          ctx: Dist = Dist()) -> TrainResult | None:
    """Train variant ``name`` with seed ``seed``, resuming from ``checkpoint`` when it
    holds a run of the same settings. Rank 0 returns the outputs, other ranks None.

    Raises StageError when the loss or the gradient becomes NaN/inf.
    """
    cfg, variant = params.train, params.variant(name)
    checkpoint, tokens_dir = Path(checkpoint), Path(tokens_dir)
    device = resolve_device(params.device)
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    tokenizer = load_tokenizer(tokenizer_path, device)
    data = load_split(tokens_dir / "train.pt", tokenizer, device)
    val = load_split(tokens_dir / "val.pt", tokenizer, device)

    model = VAR(tokenizer.vocab_size, tokenizer.latent_channels, tokenizer.patch_nums,
                len(data.classes), **params.transformer.model_dump()).to(device)
    loss_fn = build_loss(variant, tokenizer_path, model.scale_ids).to(device)
    weights = token_weights(model.scale_ids, cfg.token_weighting)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None

    # `up` with a calibrated reference: hold out a seeded slice of the training
    # images for the temperature fits; the rest is what the model trains on.
    calibrator = calib_ids = None
    fit_ids = torch.arange(len(data))
    if loss_fn.needs_calibration:
        calibrator = TemperatureCalibrator(len(model.patch_nums))
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        held = max(1, round(variant.calib_fraction * len(data)))
        calib_ids, fit_ids = perm[:held].sort().values, perm[held:].sort().values
    batches = StepBatches(len(fit_ids), cfg.batch_size, seed, ctx.rank, ctx.world)

    fingerprint = {**resolved_params(params, name, seed), "data": _digest(
        data.indices, data.labels, val.indices, val.labels, *tokenizer.state_dict().values(),
        *loss_fn.buffers())}  # the loss's buffers: the semantic clusters of `up`
    for key in ("save_every", "log_every"):
        fingerprint["train"].pop(key)  # they change no result
    del fingerprint["threads"], fingerprint["device"]  # a resumed run may use others
    step, log = 0, TrainLog()
    state = load_checkpoint(checkpoint, fingerprint)  # restores the RNG too
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        loss_fn.load_state_dict(state["loss"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        if calibrator is not None:
            calibrator.load_state_dict(state["calibrator"])
        step, log = state["step"], TrainLog(**state["log"])
        if len(state["rank_rng"]) == ctx.world:
            restore_rng(state["rank_rng"][ctx.rank])
        else:  # resumed on another number of processes
            _reseed_rank(seed, step, ctx.rank)
        if ctx.main:
            print(f"resuming {checkpoint} at step {step}/{cfg.steps}")
    else:
        if checkpoint.is_file() and ctx.main:
            print(f"ignoring {checkpoint}: written by a run with other settings or data")
        if ctx.world > 1:
            _reseed_rank(seed, 0, ctx.rank)
    del state

    net: nn.Module = model
    if ctx.world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.index is not None
                                      else None)
    if cfg.compile and device.type == "cuda":
        net = torch.compile(net)
    eval_model = ema.module if ema is not None else model
    curve_ids = fixed_subset(len(val), cfg.batch_size)  # a row costs a third of a step
    temp_names = [f"T_{p}x{p}" for p in model.patch_nums]
    tokens_per_step = cfg.batch_size * model.seq_len

    model.train()
    with progress(disable=not ctx.main) as bar:
        task = bar.add_task(f"train {name} s{seed}", total=cfg.steps, completed=step, info="")
        while step < cfg.steps:
            if calibrator is not None and step > 0 and step % variant.calib_every == 0:
                if ctx.main:
                    refit_temperatures(model, loss_fn, calibrator, data, calib_ids,
                                       cfg.batch_size, cfg.bf16)
                if ctx.world > 1:
                    dist.broadcast(loss_fn.temperatures, 0)
            started = time.perf_counter()
            lr = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.schedule,
                                    cfg.min_lr_ratio)
            set_lr(optimizer, lr)
            labels, inputs, targets = data.batch(fit_ids[batches(step)], device)
            labels = drop_labels(labels, cfg.cond_drop, model.num_classes, seed, step,
                                 ctx.rank, ctx.world)
            with _autocast(device, cfg.bf16):
                logits = net(labels, inputs)
            per_token, parts = loss_fn(logits, targets)
            loss = (per_token.mean(0) * weights).sum()

            # Every rank sees the same averaged values, so all stop together.
            reduced = torch.stack([loss.detach()] + [(p.detach().mean(0) * weights).sum()
                                                     for p in parts.values()])
            if ctx.world > 1:
                dist.all_reduce(reduced)
                reduced /= ctx.world
            values = dict(zip(["loss", *parts], reduced.tolist(), strict=True))
            if not all(math.isfinite(v) for v in values.values()):
                raise _divergence(step + 1, values, log, checkpoint)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
            if not math.isfinite(grad_norm):
                raise _divergence(step + 1, {**values, "grad_norm": grad_norm}, log, checkpoint)
            optimizer.step()
            if ema is not None:
                ema.update(model)
            step += 1
            log.seconds += time.perf_counter() - started
            log.timed_steps += 1
            log.add({**values, "grad_norm": grad_norm})

            if ctx.main and (step % cfg.log_every == 0 or step == cfg.steps):
                means = log.flush()
                scores = score_tokens(eval_model, val, curve_ids, cfg.batch_size, cfg.bf16)
                row = {"step": step, "lr": _fmt(lr), **{k: _fmt(v) for k, v in means.items()},
                       "val_ce": _fmt(float(scores.ce.sum() / scores.count.sum()))}
                if calibrator is not None:
                    row.update(zip(temp_names, map(_fmt, loss_fn.temperatures.tolist()),
                                   strict=True))
                log.rows.append(row)
                line = " ".join(f"{k} {v:.4g}" for k, v in row.items())
                bar.console.print(line, soft_wrap=True)
            if step % cfg.save_every == 0 or step == cfg.steps:
                rngs = [None] * ctx.world
                if ctx.world > 1:
                    dist.all_gather_object(rngs, rng_state())
                else:
                    rngs = [rng_state()]
                if ctx.main:
                    log.saved_step = step
                    save_checkpoint(
                        checkpoint, model=model.state_dict(), optimizer=optimizer.state_dict(),
                        loss=loss_fn.state_dict(), step=step, log=asdict(log),
                        ema=None if ema is None else ema.module.state_dict(),
                        calibrator=None if calibrator is None else calibrator.state_dict(),
                        rank_rng=rngs, fingerprint=fingerprint)
            speed = tokens_per_step * log.timed_steps / max(log.seconds, 1e-9)
            bar.update(task, completed=step,
                       info=f"loss {values['loss']:.3f}  lr {lr:.2e}  {speed / 1e3:.1f}k tok/s")

    if not ctx.main:
        return None
    return _finish(params, name, seed, model, eval_model, ema, loss_fn, calibrator, data, val,
                   fit_ids, log, tokens_per_step)


def _to_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def _finish(params: Params, name: str, seed: int, model: VAR, eval_model: VAR, ema: EMA | None,
            loss_fn: TokenLoss, calibrator: TemperatureCalibrator | None, data: TokenSplit,
            val: TokenSplit, fit_ids: torch.Tensor, log: TrainLog, tokens_per_step: int
            ) -> TrainResult:
    """Final figures on the weights that sampling will use (EMA when on)."""
    cfg = params.train
    meter = CalibrationMeter(ECE_BINS)
    val_scores = score_tokens(eval_model, val, torch.arange(len(val)), cfg.batch_size, cfg.bf16,
                              meter)
    calib = meter.compute()
    train_ids = fit_ids[fixed_subset(len(fit_ids), len(val))]
    train_scores = score_tokens(eval_model, data, train_ids, cfg.batch_size, cfg.bf16)
    train_summary = train_scores.summary(model.patch_nums)
    temperatures = loss_fn.temperatures.detach().cpu().clone() if calibrator is not None else None
    final = log.rows[-1]
    metrics = {
        "variant": name, "seed": seed, "steps": cfg.steps, "parameters": model.num_parameters(),
        "val": {**val_scores.summary(model.patch_nums),
                "ece": float(calib["ece"]), "nll": float(calib["nll"]),
                "brier": float(calib["brier"])},
        "train": {"ce": train_summary["ce"], "ce_per_scale": train_summary["ce_per_scale"],
                  "images": len(train_ids)},
        "speed": {"steps_per_s": log.timed_steps / log.seconds,
                  "tokens_per_s": tokens_per_step * log.timed_steps / log.seconds,
                  "train_seconds": log.seconds},
        "final_loss": {k: v for k, v in final.items()
                       if k not in ("step", "lr", "grad_norm", "val_ce") and not k.startswith("T_")},
    }
    if temperatures is not None:
        metrics["temperatures"] = {f"{p}x{p}": t for p, t in
                                   zip(model.patch_nums, temperatures.tolist(), strict=True)}
    saved = {"config": model.config(), "state_dict": _to_cpu(model.state_dict()),
             "ema_state_dict": None if ema is None else _to_cpu(ema.module.state_dict()),
             "variant": {"name": name, **params.variant(name).model_dump()},
             "temperatures": temperatures, "step": cfg.steps}
    return TrainResult(saved, metrics, log.rows)
