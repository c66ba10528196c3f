"""Memory per GPU and time per variant of a profile, from shapes and FLOPs alone.

Usage (from the project root):

    python bench/profile_estimate.py profiles/imagenet256-d16.yaml
    python bench/profile_estimate.py params.yaml --classes 10 --peak-tflops 312 --mfu 0.4

A profile that asks for 8 GPUs for days should say what it needs before anyone
rents them. The tokenizer and the transformer of the profile are built on the
meta device and run one training forward on fake tensors (meta storage, the
profile's device as label, no weights, no GPU), at the batch one process sees:

- activations: the bytes of every tensor autograd saves for the backward,
  counted once per storage, plus the step's inputs, logits and reference;
  with bf16 on CUDA, PyTorch's own autocast casts run on the fake tensors, and
  attention is routed to the memory-efficient kernel a GPU picks for VAR's
  block mask. Backward temporaries, cuDNN workspaces, torch.compile fusions
  and allocator fragmentation are not counted: keep headroom.
- weights and optimiser: 16 bytes per parameter (fp32 weight, gradient, AdamW's
  two moments), + 4 for DDP's gradient buckets when world > 1, + 4 for the EMA
  copy (train.ema > 0), + 4 per teacher parameter (reference: teacher).
- time: a training step costs 3 x the forward's matmul/conv/attention FLOPs
  (torch.utils.flop_counter; elementwise ops and the loss are not counted), a
  teacher 1 x; sampling one forward of the whole sequence (the KV-cached pass
  does slightly less), x 2 with guidance, plus the decoder.
  Hours = FLOPs / (world x peak x MFU), on the world GPUs together.
  Not counted: tokenize, evaluate, the temperature refits and validation passes.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from up.core.params import Params, TokenizerParams
from up.data.sources import read_class_file
from up.models.tokenizer import MultiScaleVQVAE
from up.models.transformer import VAR
from up.training.losses import check_variants, declaration, variant_loss
from up.training.tokenizer import build_tokenizer

PEAK_TFLOPS = 989.0  # H100 SXM, bf16 dense
MFU = 0.35
GPU_GB = 80.0
GB = 1e9
OPTIMIZER_BYTES = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
COPY_BYTES = 4  # one more fp32 copy: DDP buckets, EMA, teacher
CLASSES = {"imagefolder": 1000}  # every other source has 10 classes


class ProfileParams(Params):
    """A profile's params from its file alone: no params.yaml underneath, no UP_* overrides."""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **_):
        return (init_settings,)


def load_profile(path: str | Path) -> Params:
    return ProfileParams(**yaml.safe_load(Path(path).read_text()))


def world_size(launcher: str) -> int:
    """Processes the launcher starts: torchrun's nproc_per_node x nnodes; 1 for `up`."""
    if Path(launcher.split()[0]).name != "torchrun":
        return 1
    opts = {key.replace("-", "_"): value for key, value in
            re.findall(r"--(nproc[_-]per[_-]node|nnodes)[= ](\S+)", launcher)}
    try:
        return int(opts.get("nproc_per_node", 1)) * int(opts.get("nnodes", 1))
    except ValueError:
        raise ValueError(f"launcher {launcher!r}: give --nproc_per_node and --nnodes as "
                         "numbers to estimate per-GPU batches") from None


def default_classes(params: Params) -> int:
    """data.classes' count when it selects (a file of names is read from the project
    root), else the source's: 1000 for an imagefolder, 10 for the others."""
    selection = params.data.classes
    if selection is None:
        return CLASSES.get(params.data.source, 10)
    if isinstance(selection, int):
        return selection
    return len(selection if isinstance(selection, list) else read_class_file(selection))


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(identity, bytes) of a tensor's storage; meta storages all have data pointer 0,
    so the storage object itself tells them apart."""
    storage = t.untyped_storage()
    return storage._cdata, storage.nbytes()


class Probe:
    """Bytes of the tensors autograd saves inside the block (once per storage, so
    views and tensors saved twice count once) and the FLOPs it runs."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.skip = {_storage(t)[0] for t in exclude}  # weights are counted apart
        self.storages: dict[int, int] = {}
        self.flops = 0
        self._stack = ExitStack()
        self._counter = FlopCounterMode(display=False)

    def keep(self, *tensors: torch.Tensor | None) -> None:
        """Count tensors the step holds without autograd saving them (inputs, logits)."""
        for t in tensors:
            if t is not None:
                key, size = _storage(t)
                if key not in self.skip:
                    self.storages[key] = size

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.keep(t)
        return t

    def __enter__(self) -> Probe:
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        self._stack.enter_context(self._counter)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self.flops = self._counter.get_total_flops()

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def _efficient_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """F.scaled_dot_product_attention as the CUDA memory-efficient kernel: inputs in
    autocast's dtype, a boolean mask as an additive bias."""
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
    q, k, v = (t.to(dtype) for t in (q, k, v))
    bias = None
    if attn_mask is not None:
        bias = torch.zeros(attn_mask.shape, dtype=dtype, device=q.device)
        bias = bias.masked_fill(~attn_mask, -math.inf).expand(*q.shape[:2], q.shape[2], k.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, dropout_p, is_causal, scale=scale)[0]


class GPUAttention(TorchFunctionMode):
    """Fake CUDA tensors have no kernel to choose, so PyTorch would take the math
    path and save every (L, L) attention matrix in fp32, nearly doubling the
    transformer's activations; a GPU runs the memory-efficient kernel, which saves
    q, k, v, the output and one logsumexp per row."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return _efficient_attention(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextmanager
def fake_device(device: str) -> Iterator[None]:
    """Every tensor made inside is fake: shapes, dtypes and a device label, no memory.
    (Tensors are placed explicitly, not with torch.device: the `up` loss reads a
    CPU scalar tensor's value, which only a CPU fake tensor keeps.)"""
    with ExitStack() as stack:
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        if device == "cuda":
            stack.enter_context(GPUAttention())
        yield


@contextmanager
def bf16_autocast(device: str, enabled: bool) -> Iterator[None]:
    """The project's autocast (bf16 on CUDA only). torch.autocast switches itself
    off without a GPU, so its state is set directly: the dispatcher then applies
    the same casts to fake CUDA tensors as to real ones."""
    if not (enabled and device == "cuda"):
        yield
        return
    before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", before[0])
        torch.set_autocast_dtype("cuda", before[1])


@dataclass
class Row:
    """One component of the table: what one GPU holds and how long the world takes."""

    component: str
    params: int
    micro_batch: int
    activations: float  # bytes per GPU
    weights: float  # bytes per GPU: weights, gradients, optimiser and copies
    fwd_flops: float  # per image
    hours: float  # on the world GPUs together
    times: int  # how often the pipeline runs it: once, per seed, per seed and run

    @property
    def total(self) -> float:
        return self.activations + self.weights


@dataclass
class Setting:
    """What the estimate assumes besides the profile."""

    classes: int
    world: int
    device: str  # cuda | cpu: the label of the fake tensors
    peak_flops: float  # per GPU per second
    mfu: float

    def hours(self, flops: float) -> float:
        return flops / (self.world * self.peak_flops * self.mfu) / 3600


def _per_process(batch: int, world: int) -> int:
    return -(-batch // world)


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _state_bytes(params: int, world: int, copies: int = 0) -> int:
    return params * (OPTIMIZER_BYTES + COPY_BYTES * (copies + (world > 1)))


def tokenizer_step(model: MultiScaleVQVAE, tp: TokenizerParams, x: torch.Tensor,
                   probe: Probe) -> torch.Tensor:
    """The loss of up.tokenizer_training's training forward, with the partial decode
    (the decoder runs on twice the batch); the outputs held until the backward go
    to ``probe``."""
    partial = tp.partial_weight > 0 and len(tp.patch_nums) > 1
    out = model(x, partial_k=len(tp.patch_nums) - 1 if partial else None)
    probe.keep(x, out.recon, out.partial)
    loss = F.mse_loss(out.recon, x) + out.quantized.vq_loss
    return loss + tp.partial_weight * F.mse_loss(out.partial, x) if partial else loss


def tokenizer_row(params: Params, model: MultiScaleVQVAE, s: Setting) -> Row:
    """The tokenizer's step at tokenizer.micro_batch images (0: the process's share)."""
    tp = params.tokenizer
    batch = tp.micro_batch or _per_process(tp.batch_size, s.world)
    size, channels = params.data.image_size, params.data.channels
    model.train()
    with Probe(exclude=model.parameters()) as probe, bf16_autocast(s.device, tp.bf16):
        tokenizer_step(model, tp, torch.empty(batch, channels, size, size, device=s.device), probe)
    fwd = probe.flops / batch
    trained = tp.init_from is None
    return Row("tokenizer" if trained else "tokenizer (init_from: not trained)",
               _num_params(model), batch, probe.bytes, _state_bytes(_num_params(model), s.world),
               fwd, s.hours(3 * fwd * tp.steps * tp.batch_size) if trained else 0.0, 1)


def build_losses(params: Params) -> dict[str, torch.nn.Module]:
    """The trained variants' losses as up.training.run.build_loss makes them, with stand-in
    code clusters; built on real tensors, since their constructors read buffer values."""
    tp = params.tokenizer
    context = dict(code_to_cluster=torch.arange(tp.vocab_size) % tp.semantic_clusters,
                   num_clusters=tp.semantic_clusters,
                   scale_ids=torch.cat([torch.full((p * p,), k) for k, p in enumerate(tp.patch_nums)]),
                   num_scales=len(tp.patch_nums))
    return {name: variant_loss(spec, **context) for name, spec in check_variants(params).items()
            if declaration(spec.loss).module is not None}  # ts: the teacher, not trained


def transformer_rows(params: Params, model: VAR, losses: dict[str, torch.nn.Module],
                     s: Setting) -> list[Row]:
    """One training forward per variant at train.batch_size / world: the model
    once, then each variant's loss on its logits (fp32 (B, L, V), held to the end
    of the step) and, for teacher / empirical references, p_ref (B, L, V)."""
    cfg, batch = params.train, _per_process(params.train.batch_size, s.world)
    n = _num_params(model)
    model.train()
    with Probe(exclude=model.parameters()) as forward:
        labels = torch.zeros(batch, dtype=torch.long, device=s.device)
        inputs = torch.empty(batch, model.seq_len - model.first_l, model.latent_channels,
                             device=s.device)
        with bf16_autocast(s.device, cfg.bf16):
            logits = model(labels, inputs)
        forward.keep(inputs, logits)
    targets = torch.zeros(batch, model.seq_len, dtype=torch.long, device=s.device)
    rows = []
    specs = check_variants(params)
    for name, loss_fn in losses.items():
        kind = declaration(specs[name].loss).reference(specs[name])
        loss_fn.to(s.device)
        with Probe() as step:
            extra = {}
            if loss_fn.needs_reference:
                p_ref = torch.empty_like(logits)
                extra["reference"] = p_ref
                step.keep(p_ref)
            loss_fn(logits, targets, **extra)[0].mean()
        teacher = kind == "teacher"
        activations = sum({**forward.storages, **step.storages}.values())
        fwd = (forward.flops + step.flops) / batch
        flops = (3 * fwd + (forward.flops / batch if teacher else 0)) * cfg.steps * cfg.batch_size
        copies = (cfg.ema > 0) + teacher
        rows.append(Row(f"train {name}", n, batch, activations, _state_bytes(n, s.world, copies),
                        fwd, s.hours(flops), len(params.seeds)))
    return rows


def _generation_cost(var: VAR, tokenizer: MultiScaleVQVAE, s: Setting, bf16: bool
                     ) -> tuple[float, float, int]:
    """(transformer FLOPs, decoder FLOPs, KV-cache bytes) of generating one sequence.

    One full-sequence forward with the cache on stands in for the KV-cached
    pass of up.generation.sampler.sample: the same cache at the end, the same work but for
    the masked-out attention blocks (~10 % of the FLOPs at VAR-d16's sizes), and
    a tenth of the ops to fake."""
    with torch.no_grad(), bf16_autocast(s.device, bf16):
        var.enable_kv_cache(True)
        with Probe() as transformer:
            var(var.scale_ids.new_zeros(1),
                torch.empty(1, var.seq_len - var.first_l, var.latent_channels, device=s.device))
        cache = sum(t.numel() * t.element_size() for block in var.blocks for t in block.attn.cache)
        var.enable_kv_cache(False)
        with Probe() as decoder:
            tokenizer.fhat_to_image(tokenizer.empty_fhat(1))
    return transformer.flops, decoder.flops, cache


def sampling_rows(params: Params, var: VAR, tokenizer: MultiScaleVQVAE, s: Setting) -> list[Row]:
    """sample and sweep of one run (forward only), per generated image; guidance
    doubles the transformer's batch with the null class. Memory: fp32 weights, and
    for one sample.batch_size batch the KV cache and the last scale's fp32 logits;
    the sampler's (B, p_K^2, V) temporaries (guided mix, top-k/p, uncertainty) are
    not counted."""
    sp, n = params.sample, _num_params(var) + _num_params(tokenizer)
    var.eval()
    tokenizer.eval()
    transformer, decoder, cache = _generation_cost(var, tokenizer, s, params.train.bf16)
    per_row = cache + var.patch_nums[-1] ** 2 * var.vocab_size * 4

    def row(label: str, guidance: list[float], per_class: int, runs: int) -> Row:
        rows = [2 if g > 0 and not sp.unconditional else 1 for g in guidance]
        flops = sum(r * transformer + decoder for r in rows)
        return Row(label, n, sp.batch_size, sp.batch_size * max(rows) * per_row, n * COPY_BYTES,
                   flops / len(rows), s.hours(flops * per_class * s.classes),
                   len(params.seeds) * runs)

    sw, runs = params.sweep, len(params.runs)
    # the guidance axis and the truncation row (at sample.guidance) of every run
    rows = [row("sample (per run)", [sp.guidance], sp.n_per_class, runs),
            row("sweep (per run)", [*sw.guidance, *([sp.guidance] if sw.truncation else [])],
                sw.n_per_class, runs)]
    if sw.temperature_variants and sw.temperatures:  # at sample.guidance, listed runs only
        rows.append(row("sweep temperatures (per listed run)", [sp.guidance] * len(sw.temperatures),
                        sw.n_per_class, len(sw.temperature_variants)))
    return rows


def estimate(params: Params, classes: int | None = None, peak_tflops: float = PEAK_TFLOPS,
             mfu: float = MFU) -> tuple[list[Row], Setting]:
    """Rows: the tokenizer, one training row per trained variant, sample and sweep."""
    s = Setting(classes or default_classes(params), world_size(params.launcher),
                "cpu" if params.device == "cpu" else "cuda", peak_tflops * 1e12, mfu)
    tp = params.tokenizer
    with torch.device("meta"):  # initialisers run here: they read values fake tensors lack
        tokenizer = build_tokenizer(tp, params.data.channels)
        var = VAR(tp.vocab_size, tp.latent_channels, tp.patch_nums, s.classes,
                  **params.transformer.model_dump())
    losses = build_losses(params)
    with fake_device(s.device):
        tokenizer, var = tokenizer.to_empty(device=s.device), var.to_empty(device=s.device)
        rows = [tokenizer_row(params, tokenizer, s), *transformer_rows(params, var, losses, s),
                *sampling_rows(params, var, tokenizer, s)]
    return rows, s


def _precision(device: str, bf16: bool) -> str:
    return "bf16 autocast" if device == "cuda" and bf16 else "fp32"


def table(params: Params, rows: list[Row], s: Setting) -> str:
    """The rows, then what they assume and the whole pipeline's hours."""
    head = ("component", "params", "micro-batch/GPU", "activations GB", "weights+optim GB",
            "total GB/GPU", "fwd TFLOP/image", f"hours ({s.world} GPU)")
    body = [(r.component, f"{r.params / 1e6:.1f}M", str(r.micro_batch), f"{r.activations / GB:.1f}",
             f"{r.weights / GB:.1f}", f"{r.total / GB:.1f}", f"{r.fwd_flops / 1e12:.3f}",
             f"{r.hours:.3g}") for r in rows]
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(line, widths, strict=True)))
             for line in (head, *body)]
    share = _per_process(params.tokenizer.batch_size, s.world)
    total = sum(r.hours * r.times for r in rows)
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], "-" * len(lines[0]),
        f"world {s.world} ({params.launcher}); {s.classes} classes; fake {s.device} tensors: "
        f"tokenizer {_precision(s.device, params.tokenizer.bf16)}, "
        f"transformer {_precision(s.device, params.train.bf16)}; GB = 1e9 bytes",
        f"tokenizer: {rows[0].micro_batch} of the {share} images per GPU per forward, "
        f"{-(-share // rows[0].micro_batch)} forward(s) per step",
        f"hours: 3 x fwd FLOPs per training image (1 x for sampling) / ({s.world} x "
        f"{s.peak_flops / 1e12:.0f} TFLOP/s x MFU {s.mfu:.2f})",
        f"whole pipeline ({len(params.seeds)} seed(s) x {len(params.runs)} runs): {total:.1f} h "
        f"on {s.world} GPU"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="a params file (profiles/*.yaml, params.yaml)")
    parser.add_argument("--classes", type=int, default=None,
                        help="classes of the data (default: data.classes' count, else 1000 for "
                             "imagefolder, 10 for the other sources)")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS,
                        help="dense bf16 peak per GPU (default: H100 SXM)")
    parser.add_argument("--mfu", type=float, default=MFU, help="assumed model FLOPs utilisation")
    args = parser.parse_args()
    started = time.perf_counter()
    params = load_profile(args.profile)
    rows, setting = estimate(params, args.classes, args.peak_tflops, args.mfu)
    print(f"{args.profile}:")
    print(table(params, rows, setting))
    print(f"(estimated in {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
