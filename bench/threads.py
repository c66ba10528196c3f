"""What one other busy process does to a training stage's speed, per thread setting.

Usage (from the project root, on an otherwise idle machine):

    python bench/threads.py [--steps 20] [--rounds 2]

Times training steps in a fresh process per setting, each once on the idle
machine and once next to one busy process (a pure-Python spin loop, like a
browser tab or a second experiment taking a core), for two workloads: the
`ce` step of params.yaml's transformer (random tokens, the default batch:
large matrix products) and the tokenizer's step (random images, its default
batch: many small convolutions, where waking threads costs most):

- ``threads 2``: torch's intra-op pool on both cores, OpenMP's default waiting
  (idle threads spin for a while before they sleep);
- ``threads 2 passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (idle
  OpenMP threads sleep at once);
- ``threads 1``: one intra-op thread.

Settings are interleaved over ``--rounds`` so drifting load hits all alike;
the table reports the median step time and the slowdown busy / idle.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import cpu_model, save_report

SETTINGS = {"threads 2": (2, {}), "threads 2 passive": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
            "threads 1": (1, {})}
WORKLOADS = ("transformer", "tokenizer")


def _transformer_step(params):
    """A closure running one ce training step of the default transformer."""
    import torch
    import torch.nn.functional as F

    from up.models.transformer import VAR

    tp, batch = params.tokenizer, params.train.batch_size
    model = VAR(tp.vocab_size, tp.latent_channels, tp.patch_nums, 10,
                **params.transformer.model_dump())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = torch.randint(0, 10, (batch,))
    inputs = torch.randn(batch, model.seq_len - model.first_l, tp.latent_channels)
    targets = torch.randint(0, tp.vocab_size, (batch, model.seq_len))

    def step() -> None:
        loss = F.cross_entropy(model(labels, inputs).transpose(1, 2), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def _tokenizer_step(params):
    """A closure running one reconstruction + VQ step of the default tokenizer."""
    import torch
    import torch.nn.functional as F

    from up.models.tokenizer import to_float
    from up.training.tokenizer import build_tokenizer

    tp, side = params.tokenizer, params.data.image_size
    model = build_tokenizer(tp, params.data.channels).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = to_float(torch.randint(0, 256, (tp.batch_size, params.data.channels, side, side),
                               dtype=torch.uint8)).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        out = model(x)
        loss = F.mse_loss(out.recon, x) + out.quantized.vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def worker(workload: str, threads: int, steps: int) -> None:
    """Print the median ms of ``steps`` timed training steps (after 3 untimed)."""
    from up.core.params import load_params
    from up.core.runtime import setup

    params = load_params()
    setup(0, threads)
    step = (_transformer_step if workload == "transformer" else _tokenizer_step)(params)
    times = []
    for i in range(steps + 3):
        started = time.perf_counter()
        step()
        if i >= 3:
            times.append(time.perf_counter() - started)
    print(f"{1000 * statistics.median(times):.1f}")


def measure(workload: str, name: str, steps: int, busy: bool) -> float:
    threads, extra = SETTINGS[name]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | extra
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", workload, "--threads",
                               str(threads), "--steps", str(steps)],
                              env=env, capture_output=True, text=True, check=True)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", choices=WORKLOADS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("threads.md"))
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.threads, args.steps)
        return

    results: dict[tuple[str, str, bool], list[float]] = {}
    for _ in range(args.rounds):
        for workload in WORKLOADS:
            for busy in (False, True):
                for name in SETTINGS:
                    ms = measure(workload, name, args.steps, busy)
                    results.setdefault((workload, name, busy), []).append(ms)
                    print(f"{workload:11s} {name:18s} {'busy' if busy else 'idle'}: {ms:.1f} "
                          "ms/step", flush=True)
    lines = ["# Training step time next to one busy process", "",
             f"`python bench/threads.py --steps {args.steps} --rounds {args.rounds}` on {cpu_model()} "
             f"({os.cpu_count()} cores); default transformer (ce loss) and tokenizer of "
             "params.yaml at their default batches; median over rounds of each run's median "
             "step.", "",
             "| workload | setting | idle ms/step | busy ms/step | busy / idle |",
             "|---|---|---|---|---|"]
    for workload in WORKLOADS:
        for name in SETTINGS:
            idle = statistics.median(results[(workload, name, False)])
            busy = statistics.median(results[(workload, name, True)])
            lines.append(f"| {workload} | {name} | {idle:.1f} | {busy:.1f} | {busy / idle:.2f} |")
    print(save_report(lines, args.out))


if __name__ == "__main__":
    main()
