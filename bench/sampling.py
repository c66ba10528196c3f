"""Sampling throughput: with and without the KV cache, and against VAR's own sampler.

Usage (from the project root):

    python bench/sampling.py                          # default model and batch of params.yaml
    python bench/sampling.py --patch-nums 1,2,3,4,5,6,8,10,13,16   # VAR's 10 scales (L 680)
    python bench/sampling.py --against-var ~/VAR      # also VAR's autoregressive_infer_cfg
    python bench/sampling.py --compile                # also the blocks under torch.compile
    python bench/sampling.py --repeats 10 --device cuda

Builds the tokenizer and the VAR of params.yaml (tokenizer, transformer,
data.channels; 10 classes; random weights: speed does not depend on them)
and generates sample.batch_size images with the sample section's guidance,
alternating the paths in every round so all see the same machine load; in each turn a
path first generates one untimed batch, so that the timed one finds the memory
allocator as a process running only that sampler leaves it (timed right after another
path, a batch pays for the page faults of that path's different tensor sizes, and the
ratios moved with the order of the paths: docs/benchmarks.md);
reports images/s (median over repeats) and the ratios. Decoding the latent
into pixels is excluded everywhere (it is the same convolutional decoder
work whichever sampler made the tokens); our sampler still records the
per-token uncertainty of every token. Both draws (sample.draw: inverse_cdf, one
uniform per token; multinomial, torch.multinomial's one exponential per code, as
VAR draws) are timed with the cache.

``--compile`` adds the sampler with ``sample.compile`` (up.generation.sampler.
compile_for_sampling; default draw, cache) on its own copy of the same weights: the first
batch, timed apart, pays the compile; its tokens are compared with the eager sampler's.

KV cache: without it every scale re-runs the whole prefix, so a forward pass
processes sum_k end_k tokens instead of L; that ratio is the most the cache
can save, printed beside the measured speed-up.

``--against-var DIR``: DIR is a checkout of FoundationVision/VAR (its ``models/`` and ``dist.py``)
at commit 78b9539 (the code tests/fixtures/var-official/README.md names); it
stays outside this project. Its VAR gets our transformer's weights (through
``up.models.interop.export_var``) at the same configuration, and its sampler
runs with the same batch, guidance (its linear ratio k / (K - 1)), and no
top-k/top-p. Without the folder the comparison is skipped with a line saying so.

Peak memory of one batch per cache path, above what the process held before
it: on CUDA torch.cuda.max_memory_allocated, on CPU the resident set size
polled every 2 ms from /proc/self/statm (Linux).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from measure import Printed, cpu_model

from up.core.params import load_params
from up.core.runtime import resolve_device, setup
from up.generation.sampler import compile_for_sampling, sample
from up.models.interop import export_var
from up.models.transformer import VAR
from up.training.tokenizer import build_tokenizer

NUM_CLASSES = 10
OTHER_DRAW = {"inverse_cdf": "multinomial", "multinomial": "inverse_cdf"}


def build(params, device: torch.device):
    tok, tr = params.tokenizer, params.transformer
    tokenizer = build_tokenizer(tok, params.data.channels).to(device).eval()
    tokenizer.fhat_to_image = lambda f_hat: f_hat[:, :1]  # decoding excluded (see the docstring)
    var = VAR(vocab_size=tok.vocab_size, latent_channels=tok.latent_channels,
              patch_nums=tok.patch_nums, num_classes=NUM_CLASSES, depth=tr.depth,
              width=tr.width, heads=tr.heads, mlp_ratio=tr.mlp_ratio, qk_norm=tr.qk_norm)
    code_to_cluster = torch.arange(tok.vocab_size) % tok.semantic_clusters
    return var.to(device).eval(), tokenizer, code_to_cluster


def synchronised(device: torch.device, work) -> float:
    """Seconds ``work()`` takes (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def generate(params, device, models, use_cache: bool, draw: str, seed: int = 0) -> list:
    """One batch with our sampler (uncertainty recorded): its tokens per scale."""
    var, tokenizer, code_to_cluster = models
    sp = params.sample
    labels = torch.arange(sp.batch_size) % NUM_CLASSES
    generator = torch.Generator(device=device).manual_seed(seed)
    return sample(var, tokenizer, labels, guidance=sp.guidance, guidance_schedule=sp.guidance_schedule,
                  top_k=sp.top_k, top_p=sp.top_p, temperature=sp.temperature, draw=draw,
                  generator=generator, code_to_cluster=code_to_cluster,
                  num_clusters=params.tokenizer.semantic_clusters, use_cache=use_cache)[1]


def run_batch(params, device, models, use_cache: bool, draw: str, seed: int = 0) -> float:
    """Seconds to generate one batch with our sampler (uncertainty recorded)."""
    return synchronised(device, lambda: generate(params, device, models, use_cache, draw, seed))


def cache_bound(patch_nums) -> float:
    """Tokens processed without the cache / with it: sum_k end_k / L."""
    ends, total = [], 0
    for p in patch_nums:
        total += p * p
        ends.append(total)
    return sum(ends) / total


def build_official(var_dir: Path, params, ours: VAR, device: torch.device):
    """VAR's own model (its code in ``var_dir``) with our transformer's weights, or None
    (with the reason printed) when the folder does not hold VAR's models package."""
    if not (var_dir / "models" / "var.py").is_file():
        print(f"VAR comparison skipped: {var_dir}/models/var.py not found (give the folder of "
              "FoundationVision/VAR at commit 78b9539 with --against-var)")
        return None
    sys.path.insert(0, str(var_dir))
    from models.var import VAR as OfficialVAR
    from models.vqvae import VQVAE

    tok, tr = params.tokenizer, params.transformer
    vae = VQVAE(vocab_size=tok.vocab_size, z_channels=tok.latent_channels, ch=32, test_mode=True,
                share_quant_resi=min(4, len(tok.patch_nums)), v_patch_nums=tuple(tok.patch_nums))
    official = OfficialVAR(vae_local=vae, num_classes=NUM_CLASSES, depth=tr.depth,
                           embed_dim=tr.width, num_heads=tr.heads, mlp_ratio=tr.mlp_ratio,
                           drop_path_rate=0.0, norm_eps=1e-6, shared_aln=False,
                           attn_l2_norm=tr.qk_norm, patch_nums=tuple(tok.patch_nums),
                           flash_if_available=False, fused_if_available=False)
    missing, unexpected = official.load_state_dict(export_var(ours), strict=False)
    if unexpected or set(missing) - {"lvl_1L", "attn_bias_for_masking"}:
        raise SystemExit(f"our weights do not fit VAR's model: missing {missing}, unexpected {unexpected}")
    vae.fhat_to_img = lambda f_hat: f_hat[:, :1]  # decoding excluded, as on our side
    return official.to(device).eval()


def run_official(params, device, official, seed: int = 0) -> float:
    """Seconds for one batch of VAR's autoregressive_infer_cfg (no top-k / top-p)."""
    sp = params.sample
    labels = (torch.arange(sp.batch_size) % NUM_CLASSES).to(device)
    with torch.no_grad():
        return synchronised(device, lambda: official.autoregressive_infer_cfg(
            B=sp.batch_size, label_B=labels, g_seed=seed, cfg=sp.guidance, top_k=0, top_p=0.0))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_mib(params, device, models, use_cache: bool, draw: str) -> float:
    """Peak memory of one batch above the memory held before it (MiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_batch(params, device, models, use_cache, draw)
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
        run_batch(params, device, models, use_cache, draw)
    finally:
        done.set()
        poller.join()
    return (max(peak[0], rss_bytes()) - base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per path")
    parser.add_argument("--device", default=None, help="cpu | cuda | auto (default: params)")
    parser.add_argument("--patch-nums", default=None,
                        help="scales, e.g. 1,2,3,4,5,6,8,10,13,16 (default: params.yaml's)")
    parser.add_argument("--against-var", type=Path, default=None, metavar="DIR",
                        help="folder holding VAR's models/ package (commit 78b9539)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the sampler with sample.compile (torch.compile'd blocks)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the printed lines to this markdown file")
    args = parser.parse_args()
    say = Printed()

    params = load_params()
    if args.patch_nums:
        scales = [int(p) for p in args.patch_nums.split(",")]
        tok = params.tokenizer.model_copy(update={
            "patch_nums": scales, "phi_share": min(params.tokenizer.phi_share, len(scales))})
        params = params.model_copy(update={"tokenizer": tok})
    setup(params.seed, params.threads)
    device = resolve_device(args.device or params.device)
    models = build(params, device)
    sp, tr = params.sample, params.transformer
    say(f"{cpu_model()}, torch {torch.__version__}; VAR depth {tr.depth} width {tr.width} "
          f"({models[0].num_parameters() / 1e6:.2f}M params), scales {params.tokenizer.patch_nums} "
          f"(L={models[0].seq_len}), V={params.tokenizer.vocab_size}, batch {sp.batch_size}, "
          f"guidance {sp.guidance} ({sp.guidance_schedule}), device {device}, threads {params.threads}")
    # (label, KV cache, draw): sample.draw with and without the cache, and the other draw
    modes = {"cache": (True, sp.draw), "no-cache": (False, sp.draw),
             f"cache, {OTHER_DRAW[sp.draw]}": (True, OTHER_DRAW[sp.draw])}
    paths = {mode: (lambda use=use, draw=draw: run_batch(params, device, models, use, draw))
             for mode, (use, draw) in modes.items()}
    if args.compile:
        compiled = (compile_for_sampling(copy.deepcopy(models[0])),) + models[1:]
        first = synchronised(device, lambda: generate(params, device, compiled, True, sp.draw))
        same = all(torch.equal(a, b) for a, b in zip(
            generate(params, device, compiled, True, sp.draw),
            generate(params, device, models, True, sp.draw), strict=True))
        say(f"sample.compile: first batch {first:.1f} s (compile included); tokens "
            f"{'bitwise equal to' if same else 'DIFFERENT from'} the eager sampler's")
        paths["cache, compiled"] = lambda: run_batch(params, device, compiled, True, sp.draw)
    if args.against_var is not None:
        if sp.guidance_schedule != "linear" or sp.top_k or sp.top_p < 1 or sp.temperature != 1:
            raise SystemExit("the VAR comparison needs sample.guidance_schedule linear, no top-k/top-p "
                             "and temperature 1 (VAR's sampler has no other settings)")
        official = build_official(args.against_var.expanduser(), params, models[0], device)
        if official is not None:
            paths["VAR"] = lambda: run_official(params, device, official)
    times = {mode: [] for mode in paths}
    for _ in range(args.repeats):
        for mode, run in paths.items():
            run()  # untimed: the allocator settles to this path's tensors, as in a run of one sampler
            times[mode].append(run())
    rate = {mode: sp.batch_size / statistics.median(t) for mode, t in times.items()}
    for mode, (use_cache, draw) in modes.items():
        peak = peak_memory_mib(params, device, models, use_cache, draw)
        say(f"{mode:>24}: {rate[mode]:8.1f} images/s  (median of {args.repeats} batches; "
              f"peak memory of one batch {peak:.0f} MiB)")
    if "cache, compiled" in rate:
        say(f"{'cache, compiled':>24}: {rate['cache, compiled']:8.1f} images/s  (median of "
            f"{args.repeats} batches); {rate['cache, compiled'] / rate['cache']:.2f}x eager")
    bound = cache_bound(params.tokenizer.patch_nums)
    speedup = rate["cache"] / rate["no-cache"]
    say(f"KV-cache speed-up: {speedup:.2f}x of at most {bound:.2f}x (token count): "
          f"{speedup / bound:.0%} of the bound")
    other = f"cache, {OTHER_DRAW[sp.draw]}"
    say(f"sample.draw {sp.draw} / {OTHER_DRAW[sp.draw]}: {rate['cache'] / rate[other]:.2f}x")
    if "VAR" in rate:
        say(f"{'VAR':>24}: {rate['VAR']:8.1f} images/s  (autoregressive_infer_cfg, KV cache, "
            "torch.multinomial)")
        say(f"ours / VAR: {rate['cache'] / rate['VAR']:.2f}x with sample.draw {sp.draw}, "
            f"{rate[other] / rate['VAR']:.2f}x with {OTHER_DRAW[sp.draw]} "
            "(ours records per-token uncertainty)")
        if "cache, compiled" in rate:
            say(f"ours compiled / VAR: {rate['cache, compiled'] / rate['VAR']:.2f}x "
                f"(sample.compile, sample.draw {sp.draw}; VAR eager, as its sampler runs)")
    say.save(args.out, sys.argv)


if __name__ == "__main__":
    main()
