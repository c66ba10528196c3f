"""First contact with a GPU: one prepared acceptance run, written to bench/gpu_check.md.

Usage, from the project root, on a machine with one H100 or H200 (expected 5-8 minutes):

    python bench/gpu_check.py                      # every part -> bench/gpu_check.md
    python bench/gpu_check.py --parts 2,5          # some parts only (numbers below)
    python bench/gpu_check.py --device cpu --tiny --out /tmp/check.md   # toy sizes, ~1 min

Parts (VAR-d16 sizes from profiles/imagenet256-d16.yaml: depth 16, width 1024, 16 heads,
10 scales 1..16, V 4096, 1000 classes; random weights, speed does not depend on them):

1. train: the d16 training step in bf16 at the profile's per-GPU micro-batch, through
   up.training.run's build_run / train_step (variant ce): step time, tokens/s, MFU, peak
   memory against bench/profile_estimate.py's estimate of the same setting.
2. compile: the same with train.compile: first-step (compile) time and step time.
3. sample: sampling at the d16 256 px configuration (VQ-VAE at VAR's released sizes) through
   the sample stage's batch_sampler (bf16, per-token uncertainty recorded), KV cache on and
   off: images/s and the ratio.
4. tokenizer: VAR's VQ-VAE (tokenizer.arch var, released sizes) training step at the
   profile's tokenizer.micro_batch (accumulate_gradients + AdamW step): time and peak
   memory against the estimate.
5. import: random state dicts with the released files' keys and shapes
   (tests/fixtures/var-official/manifest_full_size.json) through `up import-var`, then
   `up generate` of 8 images.
6. torchrun: `torchrun --nproc_per_node=1` through the sample and evaluate stages of a tiny
   project, then a process group of the device's backend (nccl; gloo on CPU) runs the
   collectives the gather path uses.
7. numerics: the fixture model (tests/fixtures/var-official) on the device: bf16 vs fp32
   logits, and fp32 logits and greedy guided tokens against VAR's official outputs.

Each part runs in its own forked process (the parent never touches CUDA), under its own
time limit and the run's 8-minute budget: a part that raises or overruns is reported
FAILED / TIMEOUT with its error's last line and the figures it had recorded, and the
others still run. Timing: CUDA is synchronised around every timed call; figures are
medians of the timed repetitions after warm-up. Peak memory: torch.cuda.max_memory_allocated
after reset_peak_memory_stats (GB = 1e9 bytes, as the estimate). MFU: 3 x the estimate's
forward FLOPs per image x images/s / the GPU's dense bf16 peak (PEAK_TFLOPS, --peak-tflops).
"""

# ruff: noqa: E402 (the imports follow the sys.path line that lets `python bench/gpu_check.py` find them)
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/gpu_check.py`: the project's packages

import numpy as np
import torch
import torch.distributed as dist
import yaml

from bench.measure import cpu_model, save_report
from bench.profile_estimate import GB, ProfileParams, default_classes, estimate, world_size
from tests.project import CLASSES as STAGE_CLASSES
from tests.project import PATCH_NUMS as STAGE_PATCH_NUMS
from tests.project import V as STAGE_V
from tests.project import make_project, merge, save_tokens
from up.core import paths
from up.core.distributed import Dist, all_reduce_sum
from up.core.io import load_torch, save_torch
from up.core.params import Params
from up.core.runtime import autocast, resolve_device, setup
from up.data.splits import array_writer, save_split_index
from up.evaluation.evaluator import Evaluator, save_evaluator
from up.generation.sampler import batch_sampler, sample
from up.models.interop import (
    build_var,
    export_vae,
    export_var,
    import_vae,
    import_var,
    infer_vae_config,
    shapes_of,
)
from up.models.tokenizer import index_dtype
from up.models.transformer import VAR
from up.training.run import RunPaths, build_run, train_step
from up.training.schedule import StepBatches
from up.training.tokenizer import Batches, accumulate_gradients, build_tokenizer

PROFILE = ROOT / "profiles" / "imagenet256-d16.yaml"
FIXTURE = ROOT / "tests" / "fixtures" / "var-official"
REPORT = ROOT / "bench" / "gpu_check.md"
BUDGET_S = 480.0  # the whole run: 8 minutes on one H100/H200
TINY_BUDGET_S = 240.0
# Dense bf16 tensor-core peak per GPU (no sparsity), matched in this order against the name.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
               ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0)]
# Toy sizes (--tiny): every part in seconds on a CPU. The transformer's micro-batch is the
# profile's formula, train.batch_size / the launcher's 8 processes.
TINY = {
    "threads": 1,
    "data": {"image_size": 8},
    "tokenizer": {"downsample": 2, "widths": [8], "base_width": 32, "ch_mult": [1, 1],
                  "res_blocks": 1, "latent_channels": 8, "vocab_size": 64, "patch_nums": [1, 2, 4],
                  "phi_share": 2, "semantic_clusters": 8, "micro_batch": 4},
    "transformer": {"depth": 2, "width": 64, "heads": 2},
    "train": {"batch_size": 64},
    "sample": {"batch_size": 8},
}
RUN_MAPS = ("variants", "derived")  # replaced whole by an override, not merged


# -- what a part records ---------------------------------------------------------------

class Record:
    """The figures a part measured, saved to ``path`` after every one, so a part that
    fails or is killed midway still reports what it had."""

    def __init__(self, path: Path):
        self.path = path
        self.figures: list[dict] = []
        self.problems: list[str] = []
        self.status, self.error = "RUNNING", None

    def add(self, name: str, value, unit: str = "", setting: str = "") -> None:
        if isinstance(value, torch.Tensor | np.generic):
            value = value.item()
        self.figures.append({"name": name, "value": value, "unit": unit, "setting": setting})
        self.save()

    def problem(self, line: str) -> None:
        """A check that failed: the part is FAILED, its figures are kept."""
        self.problems.append(line)
        self.save()

    def finish(self, status: str, error: str | None = None) -> None:
        self.status, self.error = status, error
        self.save()

    def save(self) -> None:
        state = {"status": self.status, "error": self.error,
                 "problems": self.problems, "figures": self.figures}
        self.path.write_text(json.dumps(state, default=str))


@dataclass(frozen=True)
class Check:
    device: str  # cuda | cpu
    tiny: bool
    workdir: Path
    peak_tflops: float | None  # None: from the GPU's name (PEAK_TFLOPS)

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def scratch(self, name: str) -> Path:
        folder = self.workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder


# -- settings ----------------------------------------------------------------------------

def profile_dict(check: Check) -> dict:
    """profiles/imagenet256-d16.yaml as written (toy sizes under --tiny)."""
    raw = yaml.safe_load(PROFILE.read_text())
    return merge(raw, TINY) if check.tiny else raw


def profile_params(check: Check, **overrides) -> Params:
    """The profile for one process on the check's device (launcher `up`), with
    ``overrides`` (``variants`` / ``derived`` replace the profile's)."""
    runs = {key: overrides.pop(key) for key in RUN_MAPS if key in overrides}
    base = merge(profile_dict(check), {"device": check.device, "launcher": "up"})
    return ProfileParams(**{**merge(base, overrides), **runs})


def per_gpu_batch(check: Check, section: str = "train") -> int:
    """What one GPU of the profile's launcher takes per forward: the section's batch_size
    over the processes, or tokenizer.micro_batch when set."""
    raw = profile_dict(check)
    share = -(-raw[section]["batch_size"] // world_size(raw["launcher"]))
    return raw[section].get("micro_batch") or share


def manifest() -> dict:
    return json.loads((FIXTURE / "manifest_full_size.json").read_text())


def var_tokenizer(check: Check) -> dict:
    """tokenizer.* of VAR's VQ-VAE: the released sizes read off the manifest (toy ones
    under --tiny), as a from-scratch tokenizer (no init_from)."""
    if check.tiny:
        return {"arch": "var", "init_from": None}
    config = infer_vae_config(manifest()["vae_ch160v4096z32"])
    keys = ("base_width", "ch_mult", "res_blocks", "latent_channels", "vocab_size", "phi_share",
            "patch_nums")
    return {"arch": "var", "init_from": None, **{key: config[key] for key in keys}}


def peak_tflops(check: Check) -> float | None:
    if check.peak_tflops is not None:
        return check.peak_tflops
    if check.torch_device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


# -- measuring ---------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device):
    """(seconds, result) of ``fn()``, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> tuple[float | None, float | None]:
    """(allocated, reserved) peak since reset_peak, in GB; None on a CPU."""
    if device.type != "cuda":
        return None, None
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) / GB,
            torch.cuda.max_memory_reserved(device) / GB)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def add_speed(rec: Record, check: Check, seconds: float, images: int, tokens: int,
              fwd_flops: float, setting: str) -> None:
    """Step time, throughput and MFU of a training step of ``images`` images."""
    rec.add("step time (median)", seconds, "s", setting)
    rec.add("images/s", images / seconds, "1/s", setting)
    if tokens:
        rec.add("tokens/s", tokens / seconds, "1/s", f"{tokens} tokens per step")
    achieved = 3 * fwd_flops * images / seconds
    rec.add("achieved TFLOP/s", achieved / 1e12, "TFLOP/s",
            "3 x the estimate's forward FLOPs (matmul/conv/attention) per image x images/s")
    peak = peak_tflops(check)
    rec.add("MFU", ratio(achieved, None if peak is None else peak * 1e12), "",
            f"of {peak} TFLOP/s dense bf16" if peak else "no peak known for this device")


def add_memory(rec: Record, device: torch.device, row) -> None:
    """Peak memory of the timed steps against the estimate's row of the same setting."""
    allocated, reserved = peak_gb(device)
    rec.add("peak memory allocated", allocated, "GB",
            "torch.cuda.max_memory_allocated over the timed steps (weights, optimiser included)")
    rec.add("peak memory reserved", reserved, "GB", "torch.cuda.max_memory_reserved")
    rec.add("estimated memory", row.total / GB, "GB",
            f"bench/profile_estimate.py '{row.component}': activations {row.activations / GB:.3g} "
            f"+ weights/optimiser {row.weights / GB:.3g}")
    rec.add("measured / estimated memory", ratio(allocated, row.total / GB), "",
            "peak allocated / estimate")


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def error_line(exc: BaseException) -> str:
    """The last line of an exception's message, led by its type."""
    line = last_line("".join(traceback.format_exception_only(exc)))
    name = type(exc).__name__
    return line if line.startswith(name) else f"{name}: {line}"


# -- part 1 and 2: the transformer's training step ------------------------------------------

def token_project(root: Path, params: Params, classes: int, n_train: int, n_val: int) -> RunPaths:
    """What build_run reads: a tokenizer checkpoint (params' sizes, random weights, code
    clusters) and token caches of random codes and labels."""
    tp = params.tokenizer
    tokenizer = build_tokenizer(tp, params.data.channels)
    save_torch({"config": tokenizer.config, "state_dict": tokenizer.state_dict(),
                "code_to_cluster": torch.arange(tp.vocab_size) % tp.semantic_clusters,
                "num_clusters": tp.semantic_clusters}, root / paths.TOKENIZER)
    length = sum(p * p for p in tp.patch_nums)
    generator = torch.Generator().manual_seed(0)
    names = [str(c) for c in range(classes)]
    for split, n in (("train", n_train), ("val", n_val)):
        indices = torch.randint(tp.vocab_size, (n, length), generator=generator)
        labels = torch.randint(classes, (n,), generator=generator)
        save_tokens(root / paths.TOKENS, split, indices.to(index_dtype(tp.vocab_size)), labels,
                    names, list(tp.patch_nums))
    return RunPaths(root / "checkpoint.pt", root / paths.TOKENS, root / paths.TOKENIZER)


def training_step(check: Check, rec: Record, compiled: bool) -> None:
    """The step at the profile's per-GPU micro-batch; if that runs out of GPU memory (a
    finding: the part fails), again at half of it, so the speed is still measured."""
    batch = per_gpu_batch(check, "train")
    for attempt in (batch, batch // 2):
        try:
            return measure_training(check, rec, compiled, attempt)
        except torch.cuda.OutOfMemoryError as exc:
            error = ". ".join(str(exc).split(". ")[:2])  # "CUDA out of memory. Tried to ..."
        rec.problem(f"out of memory at micro-batch {attempt} ({error})")
        gc.collect()
        torch.cuda.empty_cache()


def measure_training(check: Check, rec: Record, compiled: bool, batch: int) -> None:
    """build_run + train_step of variant ce at ``batch`` sequences; the first step is timed
    alone (it compiles when train.compile is on)."""
    # The CPU dry run times the eager step: a compile would cost it tens of seconds and
    # tell nothing about the GPU.
    compiling = compiled and check.torch_device.type == "cuda"
    params = profile_params(check, train={"batch_size": batch, "compile": compiling},
                            variants={"ce": {"loss": "ce"}}, derived={})
    device, classes = check.torch_device, default_classes(params)
    run_paths = token_project(check.scratch(f"{'compile' if compiled else 'train'}-{batch}"),
                              params, classes, n_train=2 * batch + 16, n_val=16)
    row = next(r for r in estimate(params, classes)[0] if r.component == "train ce")
    setup(params.seed, params.threads)
    run = build_run(params, "ce", 0, run_paths)
    warmup, steps = (1, 2) if check.tiny else (3, 10)
    precision = "bf16 autocast" if device.type == "cuda" and params.train.bf16 else "fp32"
    setting = (f"depth {run.model.depth}, width {run.model.width}, "
               f"{run.model.num_parameters() / 1e6:.1f}M params, micro-batch {batch} x "
               f"L {run.model.seq_len}, {classes} classes, {precision}, "
               f"{'torch.compile' if compiling else 'eager'}, variant ce, {device}; median of "
               f"{steps} steps after {warmup} warm-up")
    if compiled and not compiling:
        rec.add("compiled", False, "", "the CPU dry run times the eager step")

    def step() -> None:
        train_step(run, run_paths.checkpoint)

    first, _ = timed(step, device)
    later = [timed(step, device)[0] for _ in range(warmup - 1)]
    reset_peak(device)
    seconds = statistics.median(timed(step, device)[0] for _ in range(steps))
    rec.add("micro-batch", batch, "sequences", f"the profile's: train.batch_size / the launcher's "
            f"processes = {per_gpu_batch(check, 'train')}")
    rec.add("first step", first, "s", "includes torch.compile's compilation" if compiling
            else "includes the CUDA/cuDNN warm-up")
    if compiling:
        from torch._dynamo.utils import counters

        rec.add("compile time", first - seconds, "s", "first step - median step")
        rec.add("slowest later warm-up step", max(later, default=None), "s", "recompiles show here")
        rec.add("graph breaks", sum(counters["graph_break"].values()), "", "torch._dynamo counters")
    add_speed(rec, check, seconds, batch, batch * run.model.seq_len, row.fwd_flops, setting)
    add_memory(rec, device, row)


def part_train(check: Check, rec: Record) -> None:
    training_step(check, rec, compiled=False)


def part_compile(check: Check, rec: Record) -> None:
    training_step(check, rec, compiled=True)


# -- part 3: sampling with and without the KV cache --------------------------------------

def all_finite(uncertainty: dict) -> bool:
    return all(bool(torch.isfinite(m).all()) for maps in uncertainty["maps"].values() for m in maps)


def part_sample(check: Check, rec: Record) -> None:
    """The sample stage's unit of work (batch_sampler: bf16 autocast on CUDA, uncertainty
    recorded), cache and no cache alternating so both see the same machine state."""
    params = profile_params(check, tokenizer=var_tokenizer(check))
    tp, sp, device = params.tokenizer, params.sample, check.torch_device
    classes = default_classes(params)
    setup(params.seed, params.threads)
    var = build_var(dict(vocab_size=tp.vocab_size, latent_channels=tp.latent_channels,
                         patch_nums=tp.patch_nums, num_classes=classes,
                         **params.transformer.model_dump()), device).eval()
    with torch.device(device):
        tokenizer = build_tokenizer(tp, params.data.channels).to(device).eval()
    bf16 = device.type == "cuda" and params.train.bf16
    labels, ids = torch.arange(sp.batch_size) % classes, torch.arange(sp.batch_size)
    run = {mode: batch_sampler(var, tokenizer, labels, params.seed, bf16, guidance=sp.guidance,
                               guidance_schedule=sp.guidance_schedule, top_k=sp.top_k,
                               top_p=sp.top_p, temperature=sp.temperature, draw=sp.draw,
                               code_to_cluster=torch.arange(tp.vocab_size) % tp.semantic_clusters,
                               num_clusters=tp.semantic_clusters, use_cache=use_cache)
           for mode, use_cache in (("KV cache", True), ("no cache", False))}
    repeats = 1 if check.tiny else 2
    for fn in run.values():  # warm-up
        fn(0, ids)
    times, peaks, uncertainty = {mode: [] for mode in run}, {}, None
    for _ in range(repeats):
        for mode, fn in run.items():
            reset_peak(device)
            seconds, (_, unc) = timed(lambda fn=fn: fn(0, ids), device)
            times[mode].append(seconds)
            peaks[mode] = peak_gb(device)[0]
            uncertainty = unc if mode == "KV cache" else uncertainty
    setting = (f"VAR depth {var.depth} ({var.num_parameters() / 1e6:.1f}M) + VQ-VAE arch var "
               f"base {tp.base_width}, {len(tp.patch_nums)} scales up to {tp.patch_nums[-1]}, "
               f"V {tp.vocab_size}, {params.data.image_size} px, batch {sp.batch_size}, guidance "
               f"{sp.guidance} ({sp.guidance_schedule}), top-k {sp.top_k}, top-p {sp.top_p}, "
               f"{'bf16 autocast' if bf16 else 'fp32'}, {device}; median of {repeats} batch(es) "
               f"after 1 warm-up")
    rate = {mode: sp.batch_size / statistics.median(t) for mode, t in times.items()}
    for mode in run:
        rec.add(f"images/s, {mode}", rate[mode], "1/s", setting)
        rec.add(f"peak memory, {mode}", peaks[mode], "GB", "max_memory_allocated of one batch")
    rec.add("KV-cache speed-up", rate["KV cache"] / rate["no cache"], "x", "images/s ratio")
    rec.add("uncertainty measures per token", len(uncertainty["maps"]), "",
            ", ".join(uncertainty["maps"]))
    rec.add("mean image entropy", uncertainty["image"]["entropy"].mean(), "nats",
            "KV-cache batch, random weights")
    finite = all_finite(uncertainty)
    rec.add("uncertainty finite", finite, "", "every map of every measure and scale")
    if not finite:
        rec.problem("non-finite per-token uncertainty")


# -- part 4: the VQ-VAE's training step -------------------------------------------------

def part_tokenizer(check: Check, rec: Record) -> None:
    """One micro-batch per step: up.training.tokenizer's accumulate_gradients (forward with
    the partial decode, backward) and the AdamW step train_tokenizer takes."""
    micro = per_gpu_batch(check, "tokenizer")
    params = profile_params(check, tokenizer={**var_tokenizer(check), "batch_size": micro})
    tp, device, size = params.tokenizer, check.torch_device, params.data.image_size
    row = estimate(params, default_classes(params))[0][0]
    setup(params.seed, params.threads)
    with torch.device(device):
        model = build_tokenizer(tp, params.data.channels)
    model.to(device, memory_format=torch.channels_last).train()  # as train_tokenizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
    images = torch.randint(0, 256, (2 * micro, params.data.channels, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    batches = Batches(images, StepBatches(len(images), tp.batch_size, params.seed, 0, 1), micro,
                      device)

    def step(s: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(model, model, batches, s, tp, params.seed, Dist(), False)
        optimizer.step()

    warmup, steps = (1, 2) if check.tiny else (2, 5)
    for s in range(warmup):
        step(s)
    reset_peak(device)
    seconds = statistics.median(timed(lambda s=s: step(s), device)[0]
                                for s in range(warmup, warmup + steps))
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    precision = "bf16 autocast" if device.type == "cuda" and tp.bf16 else "fp32"
    setting = (f"VQ-VAE arch var, base {tp.base_width}, ch_mult {tp.ch_mult}, {tp.res_blocks} res "
               f"blocks, V {tp.vocab_size}, C {tp.latent_channels} ({params_m:.1f}M params), "
               f"micro-batch {micro} of {size} px, partial decode, {precision}, {device}; median of "
               f"{steps} steps after {warmup} warm-up")
    add_speed(rec, check, seconds, micro, 0, row.fwd_flops, setting)
    add_memory(rec, device, row)


# -- part 5: import of released-size state dicts, then `up generate` ---------------------

def random_state_dict(shapes: dict, patch_nums, generator: torch.Generator) -> dict:
    """Random values with the given keys and shapes, but VAR's two layout buffers, which
    VAR's code derives from the scales (and import_var checks): lvl_1L and the
    block-causal attn_bias_for_masking."""
    lvl = torch.cat([torch.full((p * p,), k) for k, p in enumerate(patch_nums)])
    bias = torch.where(lvl[:, None] >= lvl[None, :], 0.0, -torch.inf)
    layout = {"lvl_1L": lvl.view(1, -1), "attn_bias_for_masking": bias.view(1, 1, *bias.shape)}
    return {key: layout[key] if key in layout else torch.randn(shape, generator=generator) * 0.02
            for key, shape in shapes.items()}


def released_shapes(check: Check) -> tuple[dict, dict, list[int]]:
    """(VQ-VAE shapes, transformer shapes, scales): the released files' (manifest), or
    under --tiny those VAR's files would have at the toy sizes."""
    if not check.tiny:
        return manifest()["vae_ch160v4096z32"], manifest()["var_d16"], \
            infer_vae_config(manifest()["vae_ch160v4096z32"])["patch_nums"]
    params = profile_params(check, tokenizer=var_tokenizer(check))
    tp = params.tokenizer
    with torch.device("meta"):
        vae = build_tokenizer(tp, params.data.channels)
        var = VAR(tp.vocab_size, tp.latent_channels, tp.patch_nums, default_classes(params),
                  **params.transformer.model_dump())
    return shapes_of(export_vae(vae)), shapes_of(export_var(var)), list(tp.patch_nums)


def up_command(args: list[str]) -> tuple[float, str]:
    """(seconds, stdout) of an `up` command run in this process (the CLI's own code);
    RuntimeError with its error line when it fails."""
    from stages.cli import app

    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = app(args, standalone_mode=False)
    print(out.getvalue(), err.getvalue())
    if code:
        raise RuntimeError(f"up {args[0]} exited with {code}: {last_line(err.getvalue())}")
    return time.perf_counter() - start, out.getvalue()


def part_import(check: Check, rec: Record) -> None:
    root = check.scratch("import")
    params = profile_params(check, tokenizer=var_tokenizer(check))
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    torch.set_num_threads(params.threads)
    vae_shapes, var_shapes, patch_nums = released_shapes(check)
    size = "toy sizes (--tiny)" if check.tiny else "released sizes: vae_ch160v4096z32, var_d16"
    start, generator = time.perf_counter(), torch.Generator().manual_seed(0)
    for name, shapes in (("vae.pth", vae_shapes), ("var.pth", var_shapes)):
        torch.save(random_state_dict(shapes, patch_nums, generator), root / name)
    written = sum((root / name).stat().st_size for name in ("vae.pth", "var.pth")) / GB
    rec.add("random state dicts written", written, "GB", f"{size}, in {time.perf_counter() - start:.1f} s")
    os.chdir(root)  # the `up` commands read ./params.yaml
    clusters = min(params.tokenizer.semantic_clusters, params.tokenizer.vocab_size)
    seconds, _ = up_command(["import-var", "--vae", "vae.pth", "--var", "var.pth", "--tokenizer-out",
                             "models/tokenizer.pt", "--var-out", "models/var.pt",
                             "--clusters", str(clusters)])
    rec.add("up import-var", seconds, "s", f"{size}; k-means into {clusters} code clusters")
    config = load_torch("models/var.pt")["config"]
    with torch.device("meta"):
        count = VAR(**config).num_parameters()
    rec.add("imported transformer parameters", count, "", f"depth {config['depth']}, width "
            f"{config['width']}, {config['num_classes']} classes")
    if not check.tiny and count != manifest()["var_d16_num_params"]:
        rec.problem(f"imported d16 has {count} parameters, the manifest says "
                    f"{manifest()['var_d16_num_params']}")
    seconds, out = up_command(["generate", "--checkpoint", "models/var.pt", "--tokenizer",
                               "models/tokenizer.pt", "--classes", "0,1,2,3,4,5,6,7", "--n", "1",
                               "--out", "generated.png"])
    rec.add("up generate, 8 images", seconds, "s", f"classes 0-7, one image each, {check.device}, "
            f"sample section of the profile (guidance {params.sample.guidance}), loading included")
    entropy = re.search(r"mean token entropy ([-\d.]+) nats", out)
    rec.add("mean token entropy", float(entropy.group(1)) if entropy else None, "nats",
            "printed by up generate")
    rec.add("grid written", Path("generated.png").stat().st_size / 1e3, "kB", "generated.png")


# -- part 6: torchrun through the sample and evaluate stages -----------------------------

def stage_project(root: Path, device: str) -> None:
    """tests/test_sample_scale.py's tiny project: tokenizer and token caches
    (tests/project.make_project), a perturbed VAR as models/var-ce-s0.pt, an evaluator,
    prepared test and train splits, and small sample / evaluate settings."""
    make_project(root)
    torch.manual_seed(5)
    var = VAR(STAGE_V, 4, STAGE_PATCH_NUMS, STAGE_CLASSES, depth=1, width=32, heads=2)
    with torch.no_grad():  # away from the near-identity init: samples depend on the class
        for p in var.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    save_torch(dict(config=var.config(), state_dict=var.state_dict(), ema_state_dict=None,
                    variant={"loss": "ce"}, temperatures=None, step=1), root / paths.model("ce", 0))
    save_evaluator(Evaluator(1, STAGE_CLASSES, [8], 8), root / paths.EVALUATOR)
    side = 2 * STAGE_PATCH_NUMS[-1]  # the tokenizer's image side
    # 8 test and 16 training images per class (realism: k + 1 per half of a class)
    real = torch.randint(0, 256, (24 * STAGE_CLASSES, 1, side, side), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))
    with array_writer(root / paths.PREPARED / paths.IMAGES, tuple(real.shape), "uint8") as out:
        out.write(0, real.numpy())
    save_split_index(root / paths.PREPARED, {"test": np.arange(8 * STAGE_CLASSES),
                                             "train": np.arange(8 * STAGE_CLASSES, len(real))},
                     np.arange(len(real)) % STAGE_CLASSES, [str(c) for c in range(STAGE_CLASSES)])
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), {
        "device": device, "threads": 1, "train": {"batch_size": 5},
        "sample": {"n_per_class": 5, "batch_size": 6, "grid_per_class": 2},
        "evaluate": {"kid_subset_size": 5, "kid_subsets": 4, "bootstrap": 20, "random_repeats": 2}})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def process_group_probe(device: torch.device) -> dict:
    """A process group of the device's backend over torchrun's environment: gather_object
    (what up.core.sharding gathers results with) and up.core.distributed.all_reduce_sum."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object({"rank": rank}, gathered, dst=0)
        total = all_reduce_sum(torch.ones(4), device)
    finally:
        dist.destroy_process_group()
    return {"backend": backend, "world": world,
            "gather_ok": rank != 0 or gathered == [{"rank": r} for r in range(world)],
            "all_reduce_ok": total.tolist() == [float(world)] * 4}


def torchrun_worker(out: Path) -> None:
    """The process torchrun starts (--torchrun-worker): `up sample`, `up evaluate`, then the
    process-group probe; what it saw goes to ``out``."""
    from stages.cli import app
    from up.core.params import load_params

    record: dict = {"env_world_size": int(os.environ["WORLD_SIZE"])}
    try:
        for stage in ("sample", "evaluate"):
            start = time.perf_counter()
            code = app([stage, "--variant", "ce", "--seed", "0"], standalone_mode=False)
            if code:
                raise RuntimeError(f"up {stage} exited with {code} (its error line is above)")
            record[f"{stage}_s"] = time.perf_counter() - start
        record.update(process_group_probe(resolve_device(load_params().device)))
    except BaseException as exc:
        record["error"] = error_line(exc)
        raise
    finally:
        out.write_text(json.dumps(record))


def part_torchrun(check: Check, rec: Record) -> None:
    root = check.scratch("torchrun")
    stage_project(root, check.device)
    worker_out = root / "worker.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("DVC_ROOT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(Path(__file__).resolve()), "--torchrun-worker", str(worker_out)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    print(done.stdout[-5000:], done.stderr[-5000:])
    worker = json.loads(worker_out.read_text()) if worker_out.is_file() else {}
    if done.returncode != 0:
        raise RuntimeError(f"torchrun exited with {done.returncode}: "
                           f"{worker.get('error') or last_line(done.stderr)}")
    setting = (f"torchrun --standalone --nproc_per_node=1, {check.device}; tiny project: VAR depth 1 "
               f"width 32, {STAGE_CLASSES} classes x 5 samples")
    rec.add("torchrun wall time", seconds, "s", setting + "; launcher and interpreter start included")
    rec.add("up sample", worker["sample_s"], "s", "inside the worker")
    rec.add("up evaluate", worker["evaluate_s"], "s", "inside the worker")
    saved = load_torch(root / paths.samples("ce", 0) / paths.SAMPLES_FILE)
    rec.add("samples written", len(saved["images"]), "", str(paths.samples("ce", 0)))
    metrics = json.loads((root / paths.metrics("eval-ce-s0")).read_text())
    rec.add("FID", metrics["fid"], "", "metrics/eval-ce-s0.json (tiny evaluator)")
    rec.add(f"{worker['backend']} gather_object", worker["gather_ok"], "",
            f"process group of world {worker['world']} over torchrun's environment")
    rec.add(f"{worker['backend']} all_reduce_sum", worker["all_reduce_ok"], "", "")
    rec.add("stages' process group", "none at world 1", "",
            "up.core.distributed makes a group only when WORLD_SIZE > 1: the stages ran their "
            "single-process path; the gather itself is exercised by the probe above")
    if not (worker["gather_ok"] and worker["all_reduce_ok"]):
        rec.problem(f"{worker['backend']} collectives returned wrong values")
    if len(saved["images"]) != 5 * STAGE_CLASSES or not math.isfinite(metrics["fid"]):
        rec.problem("the stages' outputs are incomplete")


# -- part 7: numerics against VAR's official outputs -------------------------------------

@contextlib.contextmanager
def strict_fp32():
    """TF32 off for matmuls and cuDNN convolutions (cuDNN's default is on)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def greedy_mismatches(var, vae, ref: dict, device: torch.device, bf16: bool = False) -> int:
    """Tokens of VAR's greedy guided sampling (top-k 1) that ours gets wrong, as
    tests/test_interop.py samples them."""
    with autocast(device, bf16):
        _, indices, _ = sample(var, vae, ref["labels"], guidance=ref["greedy_cfg"],
                               guidance_schedule="linear", top_k=1,
                               generator=torch.Generator(device=device).manual_seed(0),
                               code_to_cluster=torch.arange(vae.vocab_size) % 8, num_clusters=8)
    return sum(int((ours.flatten(1) != theirs).sum())
               for ours, theirs in zip(indices, ref["greedy_indices"], strict=True))


def part_numerics(check: Check, rec: Record) -> None:
    device = check.torch_device
    ref = torch.load(FIXTURE / "reference.pt", map_location="cpu", weights_only=True)
    var = import_var(torch.load(FIXTURE / "var.pth", map_location="cpu", weights_only=True))
    vae = import_vae(torch.load(FIXTURE / "vae.pth", map_location="cpu", weights_only=True),
                     var.patch_nums)
    var, vae = var.to(device), vae.to(device)
    labels, var_input = ref["labels"].to(device), ref["var_input"].to(device)
    tokens = sum(t.numel() for t in ref["greedy_indices"])
    setting = (f"fixture VAR (depth {var.depth}, width {var.width}, L {var.seq_len}, "
               f"V {var.vocab_size}), 2 sequences, {device}")
    with torch.no_grad(), strict_fp32():
        fp32 = var(labels, var_input).float().cpu()
        with autocast(device, True):
            bf16 = var(labels, var_input).float().cpu()
    error = float((fp32 - ref["logits"]).abs().max())
    rec.add("fp32 logits: max abs diff to VAR's", error, "", setting + "; TF32 off; tolerance 1e-4")
    diff = (bf16 - fp32).abs()
    mode = "bf16 autocast" if device.type == "cuda" else "the project's autocast (CUDA only: fp32)"
    rec.add("bf16 vs fp32 logits: max abs diff", diff.max(), "", f"{mode}; "
            f"largest fp32 logit magnitude {float(fp32.abs().max()):.3g}")
    rec.add("bf16 vs fp32 logits: mean abs diff", diff.mean(), "", mode)
    rec.add("bf16 vs fp32: top-1 agreement", (bf16.argmax(-1) == fp32.argmax(-1)).float().mean(),
            "", f"over {fp32.shape[0] * fp32.shape[1]} positions")
    with strict_fp32():
        strict = greedy_mismatches(var, vae, ref, device)
    rec.add("greedy guided tokens differing, fp32", strict, f"of {tokens}",
            f"top-k 1, guidance {ref['greedy_cfg']} linear; TF32 off")
    if device.type == "cuda":  # on a CPU both are the fp32 run again
        rec.add("greedy guided tokens differing, default backends", greedy_mismatches(
            var, vae, ref, device), f"of {tokens}", "PyTorch's defaults (cuDNN TF32 convolutions)")
        rec.add("greedy guided tokens differing, bf16", greedy_mismatches(
            var, vae, ref, device, True), f"of {tokens}", "bf16 autocast (informative: bf16 may "
            "flip near-ties)")
    if error > 1e-4:
        rec.problem(f"fp32 logits differ from VAR's by {error:.3g} (> 1e-4)")
    if strict:
        rec.problem(f"{strict} of {tokens} greedy tokens differ from VAR's in fp32")


# -- the environment --------------------------------------------------------------------

def driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True)
    return last_line(done.stdout) or None


def part_env(check: Check, rec: Record) -> None:
    rec.add("torch", torch.__version__)
    rec.add("CUDA (torch build)", torch.version.cuda)
    rec.add("Python", platform.python_version())
    rec.add("CPU", f"{cpu_model()} ({os.cpu_count()} logical cores)")
    device = check.torch_device
    if device.type != "cuda":
        rec.add("device", str(device))
        return
    props = torch.cuda.get_device_properties(device)
    rec.add("GPU", f"{props.name} ({props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} "
            f"SMs, compute capability {props.major}.{props.minor}); {torch.cuda.device_count()} visible")
    rec.add("driver", driver_version())
    rec.add("cuDNN", torch.backends.cudnn.version())
    nccl = torch.cuda.nccl.version()
    rec.add("NCCL", ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl)
    peak = peak_tflops(check)
    rec.add("bf16 peak assumed for MFU", f"{peak} TFLOP/s" if peak else "unknown (give --peak-tflops)")


# -- running the parts ------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    number: int
    key: str
    title: str
    run: Callable[[Check, Record], None]
    limit_s: float  # on the GPU
    tiny_limit_s: float = 90.0


PARTS = [
    Part(1, "train", "VAR-d16 training step, bf16, eager", part_train, 150),
    Part(2, "compile", "VAR-d16 training step, train.compile", part_compile, 300),
    Part(3, "sample", "Sampling, KV cache on and off", part_sample, 150),
    Part(4, "tokenizer", "VAR VQ-VAE training step", part_tokenizer, 120),
    Part(5, "import", "Released-size import, then up generate", part_import, 180),
    Part(6, "torchrun", "torchrun through sample and evaluate", part_torchrun, 150),
    Part(7, "numerics", "Numerics against VAR's official outputs", part_numerics, 90),
]
ENV = Part(0, "env", "Environment", part_env, 60)
ORDER = ["train", "sample", "tokenizer", "import", "torchrun", "numerics", "compile"]  # longest last


def _child(part: Part, check: Check, result: Path, log: Path) -> None:
    """A forked part: its own session (killed as a group on timeout), output to ``log``."""
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.pop("DVC_ROOT", None)
    if check.tiny:
        torch.set_num_threads(1)
    rec = Record(result)
    try:
        part.run(check, rec)
        rec.finish("FAILED" if rec.problems else "OK", rec.problems[0] if rec.problems else None)
    except BaseException as exc:  # noqa: BLE001 - reported, not raised
        traceback.print_exc()
        rec.finish("FAILED", error_line(exc))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False when no process is left in it."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stop(proc, grace: float = 10.0) -> None:
    """End a part's process group: SIGTERM (torchrun passes it on to its workers, which
    run in sessions of their own), then SIGKILL to whatever is left."""
    _signal_group(proc.pid, signal.SIGTERM)
    proc.join(grace)
    deadline = time.monotonic() + grace
    while _signal_group(proc.pid, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.join()


def run_part(part: Part, check: Check, limit: float) -> dict:
    """Run ``part`` in a forked process for at most ``limit`` seconds."""
    result, log = check.workdir / f"{part.key}.json", check.workdir / f"{part.key}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(part, check, result, log))
    start = time.perf_counter()
    proc.start()
    proc.join(limit)
    timed_out = proc.is_alive()
    if timed_out:
        _stop(proc)
    _signal_group(proc.pid, signal.SIGKILL)  # helpers it left behind (compile workers)
    seconds = time.perf_counter() - start
    state = json.loads(result.read_text()) if result.is_file() else {"figures": [], "problems": []}
    tail = last_line(log.read_text(errors="replace")) if log.is_file() else ""
    if timed_out:
        state.update(status="TIMEOUT", error=f"exceeded its {limit:.0f} s; last output: {tail}")
    elif state.get("status") not in ("OK", "FAILED"):
        state.update(status="FAILED", error=f"exit code {proc.exitcode}; last output: {tail}")
    return {**state, "seconds": seconds, "limit_s": limit}


def run_all(parts: list[Part], check: Check, budget: float) -> dict[str, dict]:
    """Every part in ORDER within the budget; a part gets min(its limit, what is left)."""
    started, results = time.perf_counter(), {}
    for part in sorted(parts, key=lambda p: ORDER.index(p.key)):
        left = budget - (time.perf_counter() - started)
        if left < 5:
            results[part.key] = {"status": "SKIPPED", "error": f"the {budget:.0f} s budget was spent",
                                 "figures": [], "problems": [], "seconds": 0.0, "limit_s": 0.0}
            continue
        limit = min(part.tiny_limit_s if check.tiny else part.limit_s, left)
        print(f"part {part.number} ({part.key}): running, limit {limit:.0f} s", flush=True)
        results[part.key] = run_part(part, check, limit)
        r = results[part.key]
        print(f"part {part.number} ({part.key}): {r['status']} in {r['seconds']:.1f} s"
              + (f": {r['error']}" if r.get("error") else ""), flush=True)
    return results


def figure(result: dict, name: str):
    return next((f["value"] for f in result.get("figures", []) if f["name"] == name), None)


def add_cross_figures(results: dict[str, dict]) -> None:
    """Figures that compare parts: the compiled step against the eager one."""
    eager = figure(results.get("train", {}), "step time (median)")
    compiled = figure(results.get("compile", {}), "step time (median)")
    if eager and compiled:
        results["compile"]["figures"].append({
            "name": "speed-up over eager (part 1)", "value": eager / compiled, "unit": "x",
            "setting": "median step times of parts 1 and 2 (separate processes)"})


# -- the report -------------------------------------------------------------------------

def fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def report(results: dict[str, dict], env: dict, check: Check, wall: float, budget: float,
           command: str) -> list[str]:
    ran = [p for p in PARTS if p.key in results]
    lines = ["# GPU acceptance check", "",
             f"`{command}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: {wall:.0f} s in all "
             f"(budget {budget:.0f} s). Sizes: {'toy (--tiny)' if check.tiny else 'full'}; "
             "what each figure was measured at is in its setting column.", "",
             "| | |", "|---|---|"]
    lines += [f"| {f['name']} | {cell(fmt(f['value']))} |" for f in env.get("figures", [])]
    if env.get("status") != "OK":
        lines.append(f"| environment | {env.get('status')}: {cell(str(env.get('error')))} |")
    lines += ["", "| part | status | seconds | limit s | error |", "|---|---|---|---|---|"]
    for p in ran:
        r = results[p.key]
        lines.append(f"| {p.number}. {p.title} | {r['status']} | {r['seconds']:.1f} | "
                     f"{r['limit_s']:.0f} | {cell(r.get('error') or '')} |")
    for p in ran:
        r = results[p.key]
        lines += ["", f"## {p.number}. {p.title}: {r['status']}", ""]
        if r.get("error"):
            lines += [f"Error: `{r['error']}`", ""]
        lines += [f"Also: {problem}" for problem in r.get("problems", [])[1:]]
        if r["figures"]:
            lines += ["| figure | value | unit | setting |", "|---|---|---|---|"]
            lines += [f"| {cell(f['name'])} | {cell(fmt(f['value']))} | {cell(f['unit'])} | "
                      f"{cell(f['setting'])} |"
                      for f in r["figures"]]
    data = {"environment": env, "parts": {p.key: {"number": p.number, "title": p.title,
                                                   **results[p.key]} for p in ran}}
    return lines + ["", "## All figures (JSON)", "", "```json", json.dumps(data, indent=1,
                                                                           default=str), "```"]


def parse_parts(text: str | None) -> list[Part]:
    if not text:
        return PARTS
    wanted = {w.strip() for w in text.split(",") if w.strip()}
    chosen = [p for p in PARTS if str(p.number) in wanted or p.key in wanted]
    if len(chosen) != len(wanted):
        raise SystemExit(f"--parts {text!r}: give numbers 1-7 or names "
                         f"{', '.join(p.key for p in PARTS)}")
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="toy sizes, every part in seconds")
    parser.add_argument("--parts", help="comma-separated part numbers or names (default: all)")
    parser.add_argument("--out", type=Path, default=REPORT, help=f"report (default {REPORT})")
    parser.add_argument("--budget", type=float, help=f"seconds for all parts (default "
                        f"{BUDGET_S:.0f}, --tiny {TINY_BUDGET_S:.0f})")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (default: "
                        "from the GPU's name)")
    parser.add_argument("--workdir", type=Path, help="keep the scratch files and logs here")
    parser.add_argument("--torchrun-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torchrun_worker is not None:
        torchrun_worker(args.torchrun_worker)
        return 0
    budget = args.budget or (TINY_BUDGET_S if args.tiny else BUDGET_S)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    check = Check(args.device, args.tiny, workdir.resolve(), args.peak_tflops)
    start = time.perf_counter()
    try:
        env = run_part(ENV, check, ENV.limit_s)
        results = run_all(parse_parts(args.parts), check, budget - env["seconds"])
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    add_cross_figures(results)
    command = "python bench/gpu_check.py " + " ".join(sys.argv[1:])
    text = save_report(report(results, env, check, time.perf_counter() - start, budget,
                              command.strip()), args.out)
    print(text.split("\n## ")[0])
    print(f"wrote {args.out}")
    return 0 if all(r["status"] == "OK" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
