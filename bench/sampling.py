"""Sampling throughput with and without the KV cache, interleaved in one process.

Usage (from the project root):

    python bench/sampling.py                 # default model and batch of params.yaml
    python bench/sampling.py --repeats 10 --device cuda

Builds the tokenizer and the VAR of params.yaml (tokenizer, transformer,
data.channels; 10 classes; random weights: speed does not depend on them)
and generates sample.batch_size images with the sample section's guidance,
alternating cache, no cache, cache, ... so both paths see the same machine
load; reports images/s (median over repeats) and the ratio. Peak memory of
one batch per path, above what the process held before it: on CUDA
torch.cuda.max_memory_allocated, on CPU the resident set size polled every
2 ms from /proc/self/statm (Linux).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import threading
import time

import torch

from up.core.params import load_params
from up.core.runtime import resolve_device, setup
from up.generation.sampler import sample
from up.models.transformer import VAR
from up.training.tokenizer import build_tokenizer

NUM_CLASSES = 10
MODES = {"cache": True, "no-cache": False}


def build(params, device: torch.device):
    tok, tr = params.tokenizer, params.transformer
    tokenizer = build_tokenizer(tok, params.data.channels).to(device).eval()
    var = VAR(vocab_size=tok.vocab_size, latent_channels=tok.latent_channels,
              patch_nums=tok.patch_nums, num_classes=NUM_CLASSES, depth=tr.depth,
              width=tr.width, heads=tr.heads, mlp_ratio=tr.mlp_ratio, qk_norm=tr.qk_norm)
    code_to_cluster = torch.arange(tok.vocab_size) % tok.semantic_clusters
    return var.to(device).eval(), tokenizer, code_to_cluster


def run_batch(params, device, models, use_cache: bool, seed: int = 0) -> float:
    """Seconds to generate one batch (synchronised on CUDA)."""
    var, tokenizer, code_to_cluster = models
    sp = params.sample
    labels = torch.arange(sp.batch_size) % NUM_CLASSES
    generator = torch.Generator(device=device).manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    sample(var, tokenizer, labels, guidance=sp.guidance, guidance_schedule=sp.guidance_schedule,
           top_k=sp.top_k, top_p=sp.top_p, temperature=sp.temperature, generator=generator,
           code_to_cluster=code_to_cluster, num_clusters=params.tokenizer.semantic_clusters,
           use_cache=use_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_mib(params, device, models, use_cache: bool) -> float:
    """Peak memory of one batch above the memory held before it (MiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_batch(params, device, models, use_cache)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    gc.collect()
    base = rss_bytes()
    peak, done = [base], threading.Event()

    def poll() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], rss_bytes())

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        run_batch(params, device, models, use_cache)
    finally:
        done.set()
        poller.join()
    return (max(peak[0], rss_bytes()) - base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per path")
    parser.add_argument("--device", default=None, help="cpu | cuda | auto (default: params)")
    args = parser.parse_args()

    params = load_params()
    setup(params.seed, params.threads)
    device = resolve_device(args.device or params.device)
    models = build(params, device)
    sp, tr = params.sample, params.transformer
    print(f"VAR depth {tr.depth} width {tr.width} ({models[0].num_parameters() / 1e6:.2f}M params), "
          f"L={models[0].seq_len}, V={params.tokenizer.vocab_size}, batch {sp.batch_size}, "
          f"guidance {sp.guidance} ({sp.guidance_schedule}), device {device}, threads {params.threads}")
    for use_cache in MODES.values():  # warm-up
        run_batch(params, device, models, use_cache)
    times = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode, use_cache in MODES.items():
            times[mode].append(run_batch(params, device, models, use_cache))
    rate = {mode: sp.batch_size / statistics.median(t) for mode, t in times.items()}
    for mode, use_cache in MODES.items():
        peak = peak_memory_mib(params, device, models, use_cache)
        print(f"{mode:>9}: {rate[mode]:8.1f} images/s  (median of {args.repeats} batches; "
              f"peak memory of one batch {peak:.0f} MiB)")
    print(f"KV-cache speed-up: {rate['cache'] / rate['no-cache']:.2f}x")


if __name__ == "__main__":
    main()
