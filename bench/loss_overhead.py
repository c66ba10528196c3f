"""Training-step time of the `up` loss against `ce`, interleaved in one process.

Usage (from the project root):

    python bench/loss_overhead.py                  # default model and batch of params.yaml
    python bench/loss_overhead.py --repeats 40 --variant up --threads 1

Builds the VAR of params.yaml's transformer section (vocabulary, scales and
latent channels from its tokenizer section, 10 classes) and one fixed random
batch of train.batch_size, then times full training steps (forward, loss,
backward, gradient clipping, AdamW step) alternating ce, up, ce, up, ...
after a warm-up. Interleaving exposes both losses to the same load on a
shared machine, so the ratio of medians is fair even when absolute times
drift; the process CPU time is printed next to the wall time because it is
less sensitive to other processes taking the cores. The loss alone (forward
+ backward on fixed logits) is timed the same way, as the least noisy view of
the extra work.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from up.config import load_params
from up.losses import build_token_loss
from up.runtime import setup
from up.transformer import VAR

NUM_CLASSES = 10


def up_options(params, name: str) -> dict:
    variant = params.variant(name)
    if variant.loss != "up":
        raise SystemExit(f"variant {name!r} is a {variant.loss!r} loss, not 'up'")
    return variant.model_dump(exclude={"loss", "calib_every", "calib_fraction"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="up", help="the up variant of params.yaml")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per loss")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per loss")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: params.yaml threads)")
    parser.add_argument("--temperature", type=float, default=1.3,
                        help="reference temperature (T != 1, as after calibration)")
    args = parser.parse_args()

    params = load_params()
    threads = args.threads or params.threads
    setup(params.seed, threads)
    tok, tr, train = params.tokenizer, params.transformer, params.train
    model = VAR(vocab_size=tok.vocab_size, latent_channels=tok.latent_channels,
                patch_nums=tok.patch_nums, num_classes=NUM_CLASSES, depth=tr.depth,
                width=tr.width, heads=tr.heads, mlp_ratio=tr.mlp_ratio,
                drop_path=tr.drop_path, qk_norm=tr.qk_norm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=(train.beta1, train.beta2),
                                  weight_decay=train.weight_decay)

    batch, length = train.batch_size, model.seq_len
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    var_input = torch.randn(batch, length - model.first_l, tok.latent_channels)
    targets = torch.randint(0, tok.vocab_size, (batch, length))
    code_to_cluster = torch.randint(0, tok.semantic_clusters, (tok.vocab_size,))
    context = dict(code_to_cluster=code_to_cluster, num_clusters=tok.semantic_clusters,
                   scale_ids=model.scale_ids, num_scales=len(tok.patch_nums))
    losses = {"ce": build_token_loss("ce", **context),
              "up": build_token_loss("up", **context, **up_options(params, args.variant))}
    if losses["up"].needs_calibration:
        losses["up"].temperatures.fill_(args.temperature)

    def train_step(loss_fn) -> None:
        total, _ = loss_fn(model(labels, var_input), targets)
        optimizer.zero_grad(set_to_none=True)
        total.mean().backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()

    with torch.no_grad():
        fixed_logits = model(labels, var_input)

    def loss_only(loss_fn) -> None:
        logits = fixed_logits.clone().requires_grad_()
        total, _ = loss_fn(logits, targets)
        total.mean().backward()

    print(f"VAR depth {tr.depth} width {tr.width}: {model.num_parameters() / 1e6:.2f} M params, "
          f"batch {batch} x L {length} x V {tok.vocab_size}, {threads} threads, "
          f"up options {up_options(params, args.variant)}")
    for label, fn in (("loss only (fwd+bwd)", loss_only), ("training step", train_step)):
        times = {name: {"wall": [], "cpu": []} for name in losses}
        for i in range(args.warmup + args.repeats):
            for name, loss_fn in losses.items():
                wall, cpu = time.perf_counter(), time.process_time()
                fn(loss_fn)
                if i >= args.warmup:
                    times[name]["wall"].append(time.perf_counter() - wall)
                    times[name]["cpu"].append(time.process_time() - cpu)
        for clock in ("wall", "cpu"):
            med = {name: statistics.median(ts[clock]) * 1e3 for name, ts in times.items()}
            print(f"{label:20s} {clock:4s}  ce {med['ce']:8.1f} ms   up {med['up']:8.1f} ms   "
                  f"ratio up/ce {med['up'] / med['ce']:.3f}   ({args.repeats} interleaved repeats)")


if __name__ == "__main__":
    main()
