"""One training loop for the VAR transformer, whatever the token loss.

Every variant (ce, ls, lr, up) runs through :func:`build_run` (model,
optimiser, loss, reference, data, resume point), :func:`train_step` and the
loop :func:`train`; only the loss module and its reference change. The `up`
loss with the calibrated reference also needs its per-scale temperatures
refitted on the calibration slice every ``calib_every`` steps, which the step
does; the teacher and empirical references are computed per batch by a
:class:`up.training.references.Reference`. The `ts` baseline trains nothing:
:func:`temperature_scale` fits the teacher's per-scale temperatures.

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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from up.core import paths
from up.core.distributed import Dist, rank_device, reseed_rank
from up.core.errors import StageError
from up.core.io import load_torch
from up.core.params import Params
from up.core.runtime import autocast, resolve_device
from up.data.tokens import TokenSplit, fixed_subset, load_token_split, training_ids
from up.models.temperature import (
    TemperatureCalibrator,
    TokenSample,
    fit_scale_temperatures,
    predict,
    token_sample,
)
from up.models.tokenizer import load_code_clusters, load_tokenizer
from up.models.transformer import VAR, compile_blocks, load_var
from up.training.checkpoint import load_checkpoint, restore_rng, rng_state, save_checkpoint
from up.training.loop import StepLoop, check_finite
from up.training.losses import LossParams, TokenLoss, declaration, variant_loss, variant_params
from up.training.references import EmpiricalTableReference, Reference, TeacherReference
from up.training.schedule import StepBatches, lr_factor, set_lr


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


def build_loss(spec: LossParams, tokenizer_path: str | Path, scale_ids: torch.Tensor) -> TokenLoss:
    """The variant's token loss, given the context its declaration asks for: the
    codebook's semantic clusters (read from the tokenizer only then), the scale of
    each position."""
    needs = declaration(spec.loss).context
    context: dict[str, Any] = {}
    if "clusters" in needs:
        code_to_cluster, num_clusters = load_code_clusters(tokenizer_path)
        context.update(code_to_cluster=code_to_cluster, num_clusters=num_clusters)
    if "scales" in needs:
        context.update(scale_ids=scale_ids, num_scales=int(scale_ids.max()) + 1)
    return variant_loss(spec, **context)


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
                 temperatures: torch.Tensor | None = None) -> TokenScores:
    """Cross-entropy and top-1 accuracy per scale, batch by batch (no (N, L, V)
    tensor is kept)."""
    scale_ids = model.scale_ids
    k = len(model.patch_nums)
    scores = TokenScores(*(torch.zeros(k, dtype=torch.float64, device=scale_ids.device)
                           for _ in range(3)))
    for logits, targets in predict(model, split, ids, batch_size, bf16, temperatures):
        ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        hits = logits.argmax(-1) == targets
        scores.ce.index_add_(0, scale_ids, ce.sum(0).double())
        scores.correct.index_add_(0, scale_ids, hits.sum(0).double())
        scores.count.index_add_(0, scale_ids, torch.full_like(scale_ids, len(targets)).double())
    return scores


# --------------------------------------------------------------------------
# The loop


def resolved_params(params: Params, name: str, seed: int) -> dict[str, Any]:
    """Every setting that defines a training run (saved next to the model)."""
    settings = {"variant": name, "seed": seed, "loss": variant_params(params, name).model_dump(),
                "transformer": params.transformer.model_dump(), "train": params.train.model_dump(),
                "threads": params.threads, "device": params.device, "pipeline_seed": params.seed}
    base = params.base(name)
    if base is not None:  # the model a derived run learns from, or a post-hoc run scales
        settings["teacher" if name in params.derived else "base"] = base
    return settings


def _digest(*tensors: torch.Tensor, chunk: int = 1 << 24) -> str:
    """SHA-256 of the tensors' bytes, read a chunk at a time: a memory-mapped token
    split is hashed without a copy of it in memory."""
    sha = hashlib.sha256()
    for t in tensors:
        flat = t.detach().reshape(-1)
        for start in range(0, flat.numel(), chunk):
            sha.update(flat[start:start + chunk].cpu().contiguous().numpy())
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


def _stop_advice(log: TrainLog, checkpoint: Path) -> str:
    if log.saved_step:
        return (f"The last good checkpoint {checkpoint} (after step {log.saved_step}) is kept; "
                "lower train.lr or raise train.warmup_steps, then rerun to resume from it.")
    return "No checkpoint was written yet; lower train.lr or raise train.warmup_steps."


def _fmt(x: float) -> float:
    return float(f"{x:.6g}")


@dataclass
class RunPaths:
    """Where a training run reads its inputs; the stage decides."""

    checkpoint: Path
    tokens: Path = paths.TOKENS
    tokenizer: Path = paths.TOKENIZER
    teacher: Path | None = None  # the teacher model (reference: teacher, loss: ts)
    reference: Path | None = None  # the empirical reference table (reference: empirical)


@dataclass
class Run:
    """Everything a training loop needs, built once (and restored on resume)."""

    name: str
    seed: int
    cfg: Any  # TrainParams
    device: torch.device
    ctx: Dist
    model: VAR
    net: nn.Module  # model, wrapped for DDP / compile
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    loss_fn: TokenLoss
    reference: Reference | None
    calibrator: TemperatureCalibrator | None
    data: TokenSplit
    val: TokenSplit
    fit_ids: torch.Tensor
    calib_ids: torch.Tensor  # the calibration slice's images (all their tokens)
    calib: TokenSample
    batches: StepBatches
    weights: torch.Tensor  # per-position token weights (L,)
    fingerprint: dict[str, Any]
    calib_every: int = 0
    step: int = 0
    log: TrainLog = field(default_factory=TrainLog)

    @property
    def eval_model(self) -> VAR:
        return self.ema.module if self.ema is not None else self.model


def _device(params: Params, ctx: Dist) -> torch.device:
    return rank_device(resolve_device(params.device), ctx)


@dataclass
class TokenData:
    """The token splits of a run and the images it trains and calibrates on."""

    data: TokenSplit
    val: TokenSplit
    fit_ids: torch.Tensor
    calib_ids: torch.Tensor  # the calibration slice's images
    calib: TokenSample  # the calibration slice's token sample

    def nonempty_calib(self) -> TokenSample:
        if len(self.calib.ids) == 0:
            raise StageError("this variant fits temperatures on the calibration slice, but "
                             "train.calib_fraction = 0 holds none out: set it > 0")
        return self.calib


def _token_data(params: Params, paths: RunPaths, tokenizer, device: torch.device,
                seed: int) -> TokenData:
    """The splits, and the images training seed ``seed`` trains on (train.images_per_class
    > 0: drawn by it) and calibrates on (fixed by the pipeline seed)."""
    cfg = params.train
    data = load_token_split(paths.tokens, "train", tokenizer, device)
    val = load_token_split(paths.tokens, "val", tokenizer, device)
    fit_ids, calib_ids = training_ids(data.labels, cfg.calib_fraction, cfg.images_per_class,
                                      params.seed, seed)
    calib = token_sample(calib_ids, tokenizer.patch_nums, cfg.calib_tokens, params.seed)
    return TokenData(data, val, fit_ids, calib_ids, calib)


def _fit_teacher(path: Path, tokens: TokenData, cfg, device: torch.device,
                 ctx: Dist) -> tuple[VAR, torch.Tensor]:
    """The teacher model and its per-scale temperatures on the calibration sample."""
    teacher = load_var(path).to(device)
    temps = fit_scale_temperatures(teacher, tokens.data, tokens.nonempty_calib(), cfg.batch_size,
                                   cfg.bf16, TemperatureCalibrator(len(teacher.patch_nums)), ctx)
    return teacher, temps


def _reference(spec: LossParams, paths: RunPaths, tokens: TokenData, cfg, device: torch.device,
               ctx: Dist) -> Reference | None:
    """The per-batch reference the variant's loss declares for its settings, if any."""
    kind = declaration(spec.loss).reference(spec)
    if kind == "teacher":
        return TeacherReference(*_fit_teacher(paths.teacher, tokens, cfg, device, ctx))
    if kind == "empirical":
        return EmpiricalTableReference.load(paths.reference, tokens.fit_ids, device)
    return None


def build_run(params: Params, name: str, seed: int, paths: RunPaths, ctx: Dist = Dist()) -> Run:
    """Model, optimiser, loss, reference and data of a run, resumed from
    ``paths.checkpoint`` when it holds a run of the same settings."""
    cfg, variant = params.train, variant_params(params, name)  # typed and checked first
    device = _device(params, ctx)
    tokenizer = load_tokenizer(paths.tokenizer, device)
    tokens = _token_data(params, paths, tokenizer, device, seed)
    data, val, fit_ids = tokens.data, tokens.val, tokens.fit_ids

    model = VAR(tokenizer.vocab_size, tokenizer.latent_channels, tokenizer.patch_nums,
                len(data.classes), **params.transformer.model_dump()).to(device)
    loss_fn = build_loss(variant, paths.tokenizer, model.scale_ids).to(device)
    reference = _reference(variant, paths, tokens, cfg, device, ctx)
    calibrator = None
    if loss_fn.needs_calibration:
        tokens.nonempty_calib()
        calibrator = TemperatureCalibrator(len(model.patch_nums))
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None

    fingerprint = {**resolved_params(params, name, seed), "data": _digest(
        data.indices, data.labels, val.indices, val.labels, fit_ids, *tokenizer.state_dict().values(),
        *loss_fn.buffers(), *(reference.tensors() if reference is not None else ()))}
    # How a run is launched is not what it computes: a run checkpointed on one process
    # resumes on eight, with other threads, devices, precision or compilation.
    for key in ("save_every", "log_every", "bf16", "compile"):
        fingerprint["train"].pop(key)
    del fingerprint["threads"], fingerprint["device"]

    run = Run(name, seed, cfg, device, ctx, model, model, ema, optimizer, loss_fn, reference,
              calibrator, data, val, fit_ids, tokens.calib_ids, tokens.calib,
              StepBatches(len(fit_ids), cfg.batch_size, seed, ctx.rank, ctx.world),
              token_weights(model.scale_ids, cfg.token_weighting), fingerprint,
              calib_every=getattr(variant, "calib_every", 0))
    if not _resume(run, paths.checkpoint) and cfg.init_from is not None:
        _initialise(model, Path(cfg.init_from))
    if ctx.world > 1:
        run.net = DistributedDataParallel(model, device_ids=[device.index]
                                          if device.index is not None else None)
    if cfg.compile:  # inductor on CUDA and CPU; its on-disk cache pays the compile once
        compile_blocks(model, "train.compile")
    return run


# Fields of a VAR config that fix the shapes of its weights (drop path does not).
SHAPE_FIELDS = ("vocab_size", "latent_channels", "patch_nums", "num_classes", "depth", "width",
                "heads", "mlp_ratio", "qk_norm")


def _initialise(model: VAR, path: Path) -> None:
    """Fine-tuning: start from the weights of ``train.init_from`` (EMA when saved)."""
    saved = load_torch(path, "train.init_from checkpoint")
    mine = model.config()
    wrong = [f"{k}: file {saved['config'].get(k)} vs params {mine[k]}" for k in SHAPE_FIELDS
             if saved["config"].get(k) != mine[k]]
    if wrong:
        raise StageError(f"train.init_from {path} does not fit this model ({'; '.join(wrong)})")
    state = saved.get("ema_state_dict") or saved["state_dict"]
    model.load_state_dict(state)


def _resume(run: Run, checkpoint: Path) -> bool:
    """Restore a checkpoint of the same run; False when there is none to resume."""
    state = load_checkpoint(checkpoint, run.fingerprint)  # restores the RNG too
    if state is None:
        if checkpoint.is_file() and run.ctx.main:
            print(f"ignoring {checkpoint}: written by a run with other settings or data")
        if run.ctx.world > 1:
            reseed_rank(run.seed, 0, run.ctx.rank)
        return False
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.loss_fn.load_state_dict(state["loss"])
    if run.ema is not None:
        run.ema.module.load_state_dict(state["ema"])
    if run.calibrator is not None:
        run.calibrator.load_state_dict(state["calibrator"])
    run.step, run.log = state["step"], TrainLog(**state["log"])
    if len(state["rank_rng"]) == run.ctx.world:
        restore_rng(state["rank_rng"][run.ctx.rank])
    else:  # resumed on another number of processes
        reseed_rank(run.seed, run.step, run.ctx.rank)
    if run.ctx.main:
        print(f"resuming {checkpoint} at step {run.step}/{run.cfg.steps}")
    return True


def _save(run: Run, checkpoint: Path) -> None:
    rngs = [None] * run.ctx.world
    if run.ctx.world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if run.ctx.main:
        run.log.saved_step = run.step
        save_checkpoint(
            checkpoint, model=run.model.state_dict(), optimizer=run.optimizer.state_dict(),
            loss=run.loss_fn.state_dict(), step=run.step, log=asdict(run.log),
            ema=None if run.ema is None else run.ema.module.state_dict(),
            calibrator=None if run.calibrator is None else run.calibrator.state_dict(),
            rank_rng=rngs, fingerprint=run.fingerprint)


def _refit(run: Run) -> None:
    """The calibrated reference's temperatures, refitted on the calibration sample
    (every process predicts its shard; all reach the same temperatures)."""
    temps = fit_scale_temperatures(run.model, run.data, run.calib, run.cfg.batch_size,
                                   run.cfg.bf16, run.calibrator, run.ctx)
    run.loss_fn.temperatures.copy_(temps)


def train_step(run: Run, checkpoint: Path) -> tuple[dict[str, float], float]:
    """One optimisation step; returns the logged values (averaged over ranks) and the lr.

    Raises StageError, before the weights change, when the loss or the
    gradient norm is not finite."""
    cfg, step = run.cfg, run.step
    if run.calibrator is not None and step > 0 and step % run.calib_every == 0:
        _refit(run)
    lr = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
    set_lr(run.optimizer, lr)
    labels, inputs, targets = run.data.batch(run.fit_ids[run.batches(step)], run.device)
    labels = drop_labels(labels, cfg.cond_drop, run.model.num_classes, run.seed, step,
                         run.ctx.rank, run.ctx.world)
    with autocast(run.device, cfg.bf16):
        logits = run.net(labels, inputs)
    extra = {} if run.reference is None else {"reference": run.reference(labels, inputs, targets)}
    per_token, parts = run.loss_fn(logits, targets, **extra)
    loss = (per_token.mean(0) * run.weights).sum()

    # Every rank sees the same averaged values, so all stop together.
    reduced = torch.stack([loss.detach()] + [(p.detach().mean(0) * run.weights).sum()
                                             for p in parts.values()])
    if run.ctx.world > 1:
        dist.all_reduce(reduced)
        reduced /= run.ctx.world
    values = dict(zip(["loss", *parts], reduced.tolist(), strict=True))
    check_finite(values, step + 1, f"train {run.name}", _stop_advice(run.log, checkpoint))

    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(
        run.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
    check_finite({**values, "grad_norm": grad_norm}, step + 1, f"train {run.name}",
                 _stop_advice(run.log, checkpoint))
    run.optimizer.step()
    if run.ema is not None:
        run.ema.update(run.model)
    run.step += 1
    return {**values, "grad_norm": grad_norm}, lr


def _log_row(run: Run, lr: float, curve_ids: torch.Tensor) -> dict[str, float]:
    means = run.log.flush()
    scores = score_tokens(run.eval_model, run.val, curve_ids, run.cfg.batch_size, run.cfg.bf16)
    doses = {f"dose_{k}": _fmt(weight * means[k]) for k, weight in run.loss_fn.weights.items()}
    row = {"step": run.step, "lr": _fmt(lr), **{k: _fmt(v) for k, v in means.items()}, **doses,
           "val_ce": _fmt(float(scores.ce.sum() / scores.count.sum()))}
    if run.calibrator is not None:
        names = [f"T_{p}x{p}" for p in run.model.patch_nums]
        row.update(zip(names, map(_fmt, run.loss_fn.temperatures.tolist()), strict=True))
    return row


def train(run: Run, checkpoint: Path) -> None:
    """Step ``run`` to ``train.steps``, logging every ``log_every`` steps and
    checkpointing every ``save_every`` (so a killed run resumes bitwise)."""
    cfg, ctx = run.cfg, run.ctx
    curve_ids = fixed_subset(len(run.val), cfg.batch_size)  # a row costs a third of a step
    tokens_per_step = cfg.batch_size * run.model.seq_len
    run.model.train()
    loop = StepLoop(f"train {run.name} s{run.seed}", cfg.steps, run.step, show=ctx.main)
    for _ in loop:
        started = time.perf_counter()
        values, lr = train_step(run, checkpoint)
        run.log.seconds += time.perf_counter() - started
        run.log.timed_steps += 1
        run.log.add(values)
        if ctx.main and loop.due(cfg.log_every):
            row = _log_row(run, lr, curve_ids)
            run.log.rows.append(row)
            loop.console.print(" ".join(f"{k} {v:.4g}" for k, v in row.items()), soft_wrap=True)
        if loop.due(cfg.save_every):
            _save(run, checkpoint)
        speed = tokens_per_step * run.log.timed_steps / max(run.log.seconds, 1e-9)
        loop.info = f"loss {values['loss']:.3f}  lr {lr:.2e}  {speed / 1e3:.1f}k tok/s"


def _to_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def evaluate_tokens(model: VAR, data: TokenSplit, val: TokenSplit, fit_ids: torch.Tensor,
                    batch_size: int, bf16: bool,
                    temperatures: torch.Tensor | None = None) -> dict[str, Any]:
    """Val CE and accuracy (per scale) on the whole val split, and the CE on as many
    training images: over-fitting shows as the gap. Calibration (ECE, NLL,
    Brier, reliability) is the evaluate stage's, computed once there."""
    val_scores = score_tokens(model, val, torch.arange(len(val)), batch_size, bf16, temperatures)
    train_ids = fit_ids[fixed_subset(len(fit_ids), min(len(val), len(fit_ids)))]
    train_summary = score_tokens(model, data, train_ids, batch_size, bf16,
                                 temperatures).summary(model.patch_nums)
    return {"val": val_scores.summary(model.patch_nums),
            "train": {"ce": train_summary["ce"], "ce_per_scale": train_summary["ce_per_scale"],
                      "images": len(train_ids)}}


def calibration_nll(model: VAR, data: TokenSplit, calib_ids: torch.Tensor, batch_size: int,
                    bf16: bool, temperatures: torch.Tensor | None = None) -> dict[str, Any]:
    """Mean token NLL over every token of the calibration slice's images, all scales:
    the score of the declared weight-selection rule (lowest calibration NLL; never val
    or test). ``temperatures``: per-scale logit temperatures (a `ts` model's fit);
    None reads the model's own probabilities. The NLL is None without a slice."""
    scores = score_tokens(model, data, calib_ids, batch_size, bf16, temperatures)
    tokens = int(scores.count.sum())
    return {"nll": float(scores.ce.sum() / tokens) if tokens else None, "tokens": tokens}


def training_compute(model: VAR, steps: int, batch_size: int,
                     teacher: VAR | None = None) -> dict[str, float]:
    """Analytic training FLOPs (GFLOP): the student's forward and backward, about 3x
    its forward, per image of every step, plus one teacher forward per image for a
    variant trained against a teacher. The evaluation rows and the temperature fits
    are not counted (a few forwards of the calibration slice)."""
    images = steps * batch_size
    student = 3 * model.forward_flops() * images / 1e9
    extra = teacher.forward_flops() * images / 1e9 if teacher is not None else 0.0
    return {"student_gflop": student, "teacher_gflop": extra, "total_gflop": student + extra}


def finish(run: Run, params: Params) -> TrainResult:
    """Final figures on the weights that sampling will use (EMA when on)."""
    cfg, model, log = run.cfg, run.model, run.log
    temperatures = run.loss_fn.temperatures.detach().cpu().clone() \
        if run.calibrator is not None else None
    metrics = {
        "variant": run.name, "seed": run.seed, "steps": cfg.steps,
        "parameters": model.num_parameters(), "train_images": len(run.fit_ids),
        **evaluate_tokens(run.eval_model, run.data, run.val, run.fit_ids, cfg.batch_size,
                          cfg.bf16),
        "speed": {"steps_per_s": log.timed_steps / log.seconds,
                  "tokens_per_s": cfg.batch_size * model.seq_len * log.timed_steps / log.seconds,
                  "train_seconds": log.seconds},
        "final_loss": {k: v for k, v in log.rows[-1].items()
                       if k not in ("step", "lr", "grad_norm", "val_ce")
                       and not k.startswith(("T_", "dose_"))},
        # each term as it enters the total (weight x term) at the last logged window
        "dose": {"ce": log.rows[-1]["ce"],
                 **{k: log.rows[-1][f"dose_{k}"] for k in run.loss_fn.weights}},
        "calib": calibration_nll(run.eval_model, run.data, run.calib_ids, cfg.batch_size,
                                 cfg.bf16),
        "compute": training_compute(
            model, cfg.steps, cfg.batch_size,
            run.reference.model if isinstance(run.reference, TeacherReference) else None),
    }
    if temperatures is not None:
        metrics["temperatures"] = {f"{p}x{p}": t for p, t in
                                   zip(model.patch_nums, temperatures.tolist(), strict=True)}
    saved = {"config": model.config(), "state_dict": _to_cpu(model.state_dict()),
             "ema_state_dict": None if run.ema is None else _to_cpu(run.ema.module.state_dict()),
             "variant": {"name": run.name, **variant_params(params, run.name).model_dump()},
             "temperatures": temperatures, "logit_temperatures": None, "step": cfg.steps}
    return TrainResult(saved, metrics, log.rows)


def temperature_scale(params: Params, name: str, seed: int, paths: RunPaths) -> TrainResult:
    """A `ts` run: its base model's weights (``paths.teacher``: the teacher of a
    `derived` ts run, the listed run of a `post_hoc` one) with one logit temperature
    per scale, fitted on the calibration slice (the images no variant trains on).
    The saved settings say whether sampling draws at the temperatures
    (``sample_at_temperatures``) or keeps the base model's samples (a calibrator)."""
    cfg, spec = params.train, variant_params(params, name)  # typed and checked first
    device = _device(params, Dist())
    tokens = _token_data(params, paths, load_tokenizer(paths.tokenizer, device), device, seed)
    data, val, fit_ids = tokens.data, tokens.val, tokens.fit_ids
    model, temps = _fit_teacher(paths.teacher, tokens, cfg, device, Dist())
    temps = temps.float()
    saved = load_torch(paths.teacher, "teacher checkpoint")  # written out with its temperatures
    metrics = {"variant": name, "seed": seed, "teacher": str(paths.teacher),
               "parameters": model.num_parameters(), "train_images": len(fit_ids),
               **evaluate_tokens(model, data, val, fit_ids, cfg.batch_size, cfg.bf16, temps),
               "logit_temperatures": {f"{p}x{p}": t for p, t in
                                      zip(model.patch_nums, temps.tolist(), strict=True)}}
    saved = {**saved, "variant": {"name": name, **spec.model_dump()},
             "logit_temperatures": temps.cpu()}
    row = {"step": 0, "val_ce": _fmt(metrics["val"]["ce"]),
           **{f"T_{p}x{p}": _fmt(t) for p, t in zip(model.patch_nums, temps.tolist(), strict=True)}}
    return TrainResult(saved, metrics, [row])
