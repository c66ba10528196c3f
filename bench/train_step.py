"""Training-step speed against the machine's fp32 matmul peak, measured side by side.

Usage (from the project root):

    python bench/train_step.py                      # the default step of params.yaml, and eager
    python bench/train_step.py --against HEAD~3     # and the transformer of another commit
    python bench/train_step.py --compile            # the compiled step even if params say eager

The step is the training loop's work for one batch of train.batch_size: forward,
cross-entropy, backward, gradient clipping and AdamW, on the default VAR of
params.yaml (10 classes, one fixed random batch; speed does not depend on the
data). The default step runs the model's blocks under torch.compile when train.compile
is true (params.yaml's default; up.models.transformer.compile_blocks), and the eager
model, the plain reference, is timed beside it.
Its FLOPs are counted once with FlopCounterMode, so each path's rate is
FLOP / s, printed as a share of the peak of a large fp32 matmul (and of a bf16
one) timed in the same run at the same thread count: the fp32 matmul is timed again in
every round beside the steps, and the share is the median over rounds of each round's.
``--against REF`` loads up/models/transformer.py as it was at git REF into the same
process, copies the same initial weights into it and interleaves the paths, so the ratio
is fair on a loaded machine. Every other path is also trained for --check-steps steps
from the eager path's weights and the bench prints how far its losses drift from the
eager ones (floating-point noise, if it only reorders arithmetic).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from measure import Printed, cpu_model
from torch.utils.flop_counter import FlopCounterMode

from up.core.params import load_params
from up.core.runtime import setup
from up.models import transformer
from up.training.losses import build_token_loss

NUM_CLASSES = 10


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n x n x n matmul (median of ``repeats``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def module_at(ref: str):
    """up/models/transformer.py as it was at git ``ref``, imported under another name."""
    source = subprocess.run(["git", "show", f"{ref}:up/models/transformer.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "transformer_ref.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("transformer_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Step:
    """One model, its optimizer and the fixed batch: ``run()`` is one training step."""

    def __init__(self, model, batch: dict, params):
        train = params.train
        self.model, self.batch, self.grad_clip = model, batch, train.grad_clip
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr,
                                           betas=(train.beta1, train.beta2),
                                           weight_decay=train.weight_decay)
        self.loss = build_token_loss("ce")
        self.forward = model

    def run(self) -> float:
        total, _ = self.loss(self.forward(self.batch["labels"], self.batch["inputs"]),
                             self.batch["targets"])
        loss = total.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return loss.item()


def build(module, params, state: dict | None = None):
    tok, tr = params.tokenizer, params.transformer
    model = module.VAR(vocab_size=tok.vocab_size, latent_channels=tok.latent_channels,
                       patch_nums=tok.patch_nums, num_classes=NUM_CLASSES, **tr.model_dump())
    if state is not None:
        model.load_state_dict(state)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default=None, metavar="REF", help="git ref of the baseline")
    parser.add_argument("--compile", action="store_true",
                        help="also time the compiled step when train.compile is false")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per path")
    parser.add_argument("--check-steps", type=int, default=20,
                        help="steps trained by both paths from one init (loss drift)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the printed lines to this markdown file")
    args = parser.parse_args()
    say = Printed()

    params = load_params()
    setup(params.seed, params.threads)
    tok, batch_size = params.tokenizer, params.train.batch_size
    init = build(transformer, params)
    state = {k: v.clone() for k, v in init.state_dict().items()}
    length = init.seq_len
    batch = dict(labels=torch.randint(0, NUM_CLASSES, (batch_size,)),
                 inputs=torch.randn(batch_size, length - init.first_l, tok.latent_channels),
                 targets=torch.randint(0, tok.vocab_size, (batch_size, length)))
    makers = {"eager": lambda: Step(build(transformer, params, state), batch, params)}
    if args.against:
        against = module_at(args.against)
        makers[args.against] = lambda: Step(build(against, params, state), batch, params)
    if params.train.compile or args.compile:
        makers["compiled"] = lambda: compiled_step(build(transformer, params, state), batch, params)
    default = "compiled" if params.train.compile else "eager"
    say(f"default step (params.yaml train.compile: {str(params.train.compile).lower()}): {default}")
    paths = {name: make() for name, make in makers.items()}
    if "compiled" in paths:
        start = time.perf_counter()
        paths["compiled"].run()
        say(f"compiled: first step {time.perf_counter() - start:.1f} s (compile included)")

    with FlopCounterMode(display=False) as counter:
        Step(build(transformer, params, state), batch, params).run()
    flops = counter.get_total_flops()
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    say(f"{cpu_model()}, {params.threads} threads, torch {torch.__version__}; "
          f"VAR depth {params.transformer.depth} width {params.transformer.width}, batch {batch_size} "
          f"x L {length} x V {tok.vocab_size}: {flops / 1e9:.1f} GFLOP per step")
    say(f"matmul peak 2048^3: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")

    for step in paths.values():  # warm-up
        step.run()
    # the peak is timed again in every round, beside the steps: a share of a peak timed
    # once moved between 37 % and 48 % on one machine as its clock and neighbours moved
    times, peaks = {name: [] for name in paths}, []
    for _ in range(args.repeats):
        peaks.append(matmul_peak(torch.float32, repeats=1))
        for name, step in paths.items():
            start = time.perf_counter()
            step.run()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in median.items():
        rate = flops / seconds / 1e9
        share = statistics.median(flops / t / 1e9 / p for t, p in zip(times[name], peaks, strict=True))
        say(f"{name:>12}: {seconds * 1e3:7.1f} ms/step  {rate:6.1f} GFLOP/s = {share:.0%} "
            f"of the fp32 matmul peak of its round  ({median['eager'] / seconds:.2f}x eager's "
            f"speed){'  <- default' if name == default else ''}")
    say(f"fp32 matmul peak per round: median {statistics.median(peaks):.0f} GFLOP/s "
        f"(range {min(peaks):.0f}-{max(peaks):.0f})")
    if args.check_steps:
        losses = {}
        for name, make in makers.items():  # fresh steps: the same weights and optimizer state
            torch.manual_seed(0)
            step = make()
            losses[name] = [step.run() for _ in range(args.check_steps)]
        for name, curve in losses.items():
            if name != "eager":
                say(drift(name, curve, losses["eager"]))
    say.save(args.out, sys.argv)


def compiled_step(model, batch: dict, params) -> Step:
    """The step with the model's blocks under torch.compile, as train.compile runs it."""
    return Step(transformer.compile_blocks(model, "train.compile"), batch, params)


def drift(name: str, losses: list[float], eager: list[float]) -> str:
    """The largest relative gap between a path's losses and eager's, step by step."""
    gap = max(abs(a - b) / abs(b) for a, b in zip(losses, eager, strict=True))
    return (f"loss over {len(eager)} steps from one init: eager {eager[-1]:.7f}, {name} "
            f"{losses[-1]:.7f}; largest relative gap {gap:.1e}")


if __name__ == "__main__":
    sys.exit(main())
