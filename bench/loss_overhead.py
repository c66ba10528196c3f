"""Training-step time of the `up` loss variants against `ce`, interleaved in one process.

Usage (from the project root):

    python bench/loss_overhead.py                  # default model and batch of params.yaml
    python bench/loss_overhead.py --repeats 40 --threads 1

Builds the VAR of params.yaml's transformer section (vocabulary, scales and
latent channels from its tokenizer section, 10 classes) and one fixed random
batch of train.batch_size, then times full training steps (forward, loss,
backward, gradient clipping, AdamW step) for, in turn:

- ``ce``: cross-entropy;
- ``up fused``: the `up` loss of params.yaml's `up` variant with the
  calibrated reference (T = --temperature, as after a refit), fused kernel;
- ``up plain``: the same loss as the plain composition of the public
  functions (``fused: false``), the number that justifies the fused kernel;
- ``up teacher``: the fused loss against a frozen teacher of the same size,
  whose no-grad forward runs every step;
- ``up empirical``: the fused loss against the empirical reference
  (context parent_class, counted on 2,000 random token images).

Interleaving exposes every variant to the same load on a shared machine, so
ratios of medians are fair even when absolute times drift; the process CPU
time is printed next to the wall time because it is less sensitive to other
processes taking the cores. The loss alone (forward + backward on fixed
logits, reference included) is timed the same way, as the least noisy view of
the extra work.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from up.core.params import load_params
from up.core.runtime import setup
from up.models.transformer import VAR
from up.training.empirical import EmpiricalReference
from up.training.losses import build_token_loss, variant_params
from up.training.references import EmpiricalTableReference, TeacherReference

NUM_CLASSES = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="up", help="the up variant of params.yaml")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per loss")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per loss")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: params.yaml threads)")
    parser.add_argument("--temperature", type=float, default=1.3,
                        help="calibrated reference temperature (T != 1, as after a refit)")
    args = parser.parse_args()

    params = load_params()
    threads = args.threads or params.threads
    setup(params.seed, threads)
    tok, tr, train = params.tokenizer, params.transformer, params.train

    def build_var() -> VAR:
        return VAR(vocab_size=tok.vocab_size, latent_channels=tok.latent_channels,
                   patch_nums=tok.patch_nums, num_classes=NUM_CLASSES,
                   **tr.model_dump())

    model = build_var()
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=(train.beta1, train.beta2),
                                  weight_decay=train.weight_decay)
    batch, length = train.batch_size, model.seq_len
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    var_input = torch.randn(batch, length - model.first_l, tok.latent_channels)
    targets = torch.randint(0, tok.vocab_size, (batch, length))
    context = dict(code_to_cluster=torch.randint(0, tok.semantic_clusters, (tok.vocab_size,)),
                   num_clusters=tok.semantic_clusters, scale_ids=model.scale_ids,
                   num_scales=len(tok.patch_nums))
    variant = variant_params(params, args.variant)
    options = variant.model_dump(exclude={"loss", "calib_every", "reference", "fused"})

    def up_loss(reference: str, fused: bool = True):
        loss = build_token_loss("up", **context, **options, reference=reference, fused=fused)
        if loss.needs_calibration:
            loss.temperatures.fill_(args.temperature)
        return loss

    teacher = TeacherReference(build_var(), torch.full((len(tok.patch_nums),), args.temperature))
    counted = torch.randint(0, tok.vocab_size, (2000, length))
    table = EmpiricalReference.fit(counted, torch.randint(0, NUM_CLASSES, (2000,)),
                                   tok.patch_nums, tok.vocab_size, NUM_CLASSES, "parent_class",
                                   10.0)
    empirical = EmpiricalTableReference(table)
    runs = {"ce": (build_token_loss("ce", **context), None),
            "up fused": (up_loss("calibrated"), None),
            "up plain": (up_loss("calibrated", fused=False), None),
            "up teacher": (up_loss("teacher"), teacher),
            "up empirical": (up_loss("empirical"), empirical)}

    def extra(reference) -> dict:
        return {} if reference is None else {"reference": reference(labels, var_input, targets)}

    def train_step(loss_fn, reference) -> None:
        total, _ = loss_fn(model(labels, var_input), targets, **extra(reference))
        optimizer.zero_grad(set_to_none=True)
        total.mean().backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()

    with torch.no_grad():
        fixed_logits = model(labels, var_input)

    def loss_only(loss_fn, reference) -> None:
        logits = fixed_logits.clone().requires_grad_()
        total, _ = loss_fn(logits, targets, **extra(reference))
        total.mean().backward()

    print(f"VAR depth {tr.depth} width {tr.width}: {model.num_parameters() / 1e6:.2f} M params, "
          f"batch {batch} x L {length} x V {tok.vocab_size}, {threads} threads, "
          f"up options {options}; empirical table {table.memory_bytes() / 2**20:.1f} MiB")
    for label, fn in (("loss only (fwd+bwd)", loss_only), ("training step", train_step)):
        times = {name: {"wall": [], "cpu": []} for name in runs}
        for i in range(args.warmup + args.repeats):
            for name, (loss_fn, reference) in runs.items():
                wall, cpu = time.perf_counter(), time.process_time()
                fn(loss_fn, reference)
                if i >= args.warmup:
                    times[name]["wall"].append(time.perf_counter() - wall)
                    times[name]["cpu"].append(time.process_time() - cpu)
        for clock in ("wall", "cpu"):
            med = {name: statistics.median(ts[clock]) * 1e3 for name, ts in times.items()}
            cells = "  ".join(f"{name} {ms:7.1f} ms ({ms / med['ce']:.2f}x)"
                              for name, ms in med.items())
            print(f"{label:20s} {clock:4s}  {cells}   [{args.repeats} interleaved repeats]")


if __name__ == "__main__":
    main()
