"""The VAR transformer: next-scale prediction over multi-scale token maps.

Follows Tian et al. 2024 (VAR): the class embedding is both the start token
and the AdaLN condition of every block; positions of scale k attend to every
position of scales <= k (block-causal); the last class id is the null class
used for classifier-free guidance. For sampling, attention layers keep a KV
cache so that each step feeds only the new scale's tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from up.core.errors import StageError
from up.core.inductor import require_compiler
from up.core.io import load_torch

LN_EPS = 1e-6


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class SelfAttention(nn.Module):
    """Multi-head attention with q/v biases (no k bias, as in VAR).

    With ``qk_norm`` q and k are L2-normalised and q is multiplied by a
    learned per-head scale (VAR's attn_l2_norm): logits stay bounded, which
    is what keeps VAR stable in bf16.
    """

    def __init__(self, width: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)
        self.qk_norm = qk_norm
        if qk_norm:
            self.log_scale = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.caching = False
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, values (B, H, l, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, L, W = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(B, L, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, d)
        scale = None
        if self.qk_norm:
            q = F.normalize(q, dim=-1) * self.log_scale.clamp(max=math.log(100.0)).exp()
            k = F.normalize(k, dim=-1)
            scale = 1.0
        if self.caching:
            k, v = self._cached(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, W))


    def _cached(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every position so far: this scale's appended to the earlier
        scales'. A concatenation per scale copies the prefix, yet it measured 1.1x faster
        on the CPU than writing into buffers allocated once for the whole sequence, whose
        strided views slow the attention kernel (docs/benchmarks.md); the values are the same."""
        if self.cache is not None:
            k = torch.cat((self.cache[0], k), dim=2)
            v = torch.cat((self.cache[1], v), dim=2)
        self.cache = (k, v)
        return k, v


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated by the condition
    (VAR's AdaLNSelfAttn): the class steers every layer, not only the input."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, drop_path: float,
                 qk_norm: bool):
        super().__init__()
        self.width = width
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.norm = nn.LayerNorm(width, eps=LN_EPS, elementwise_affine=False)
        self.attn = SelfAttention(width, heads, qk_norm)
        self.mlp = MLP(width, round(width * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(gamma1, gamma2, scale1, scale2, shift1, shift2), each (B, 1, W): a function of
        the class alone, so sampling computes it once per image, not once per scale."""
        return self.ada_lin(cond).view(-1, 1, 6, self.width).unbind(2)

    def forward(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...], mask: torch.Tensor | None
                ) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod
        h = self.attn(self.norm(x).mul(scale1 + 1).add_(shift1), mask)
        x = x + self.drop_path(h * gamma1)
        h = self.mlp(self.norm(x).mul(scale2 + 1).add_(shift2))
        return x + self.drop_path(h * gamma2)


class AdaLNHead(nn.Module):
    """Final AdaLN modulation and the projection to codebook logits."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.width = width
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.norm = nn.LayerNorm(width, eps=LN_EPS, elementwise_affine=False)
        self.out = nn.Linear(width, vocab_size)

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(scale, shift), each (B, 1, W)."""
        return self.ada_lin(cond).view(-1, 1, 2, self.width).unbind(2)

    def forward(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        scale, shift = mod
        return self.out(self.norm(x).mul(scale + 1).add_(shift)).float()


class VAR(nn.Module):
    """Class-conditional next-scale predictor over ``patch_nums`` token maps.

    Sequence layout: ``p_1^2`` start positions (class embedding + learned
    start position), then for scales 2..K the teacher-forcing features
    (C channels) embedded linearly. Every position gets a learned scale
    embedding and a learned absolute position embedding.
    """

    def __init__(self, vocab_size: int, latent_channels: int, patch_nums, num_classes: int,
                 depth: int, width: int, heads: int, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0, qk_norm: bool = True):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        self._config = dict(vocab_size=vocab_size, latent_channels=latent_channels,
                            patch_nums=[int(p) for p in patch_nums], num_classes=num_classes,
                            depth=depth, width=width, heads=heads, mlp_ratio=mlp_ratio,
                            drop_path=drop_path, qk_norm=qk_norm)
        self.vocab_size, self.latent_channels = vocab_size, latent_channels
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.num_classes, self.depth, self.width = num_classes, depth, width
        self.first_l = self.patch_nums[0] ** 2
        sizes = [p * p for p in self.patch_nums]
        self.seq_len = sum(sizes)
        self.begin_ends = [(sum(sizes[:k]), sum(sizes[: k + 1])) for k in range(len(sizes))]

        self.class_emb = nn.Embedding(num_classes + 1, width)  # last id = null class
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, width))
        self.word_embed = nn.Linear(latent_channels, width)
        self.scale_embed = nn.Embedding(len(self.patch_nums), width)
        self.pos_embed = nn.Parameter(torch.empty(1, self.seq_len, width))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # VAR: linear in depth
        self.blocks = nn.ModuleList(
            AdaLNBlock(width, heads, mlp_ratio, rate, qk_norm) for rate in rates
        )
        self.head = AdaLNHead(width, vocab_size)

        scale_ids = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
        self.register_buffer("scale_ids", scale_ids, persistent=False)
        # True = may attend: a token sees its own scale and every coarser one.
        mask = scale_ids[:, None] >= scale_ids[None, :]
        self.register_buffer("attn_mask", mask, persistent=False)
        self._next_scale = 0
        self._modulations: list[tuple[torch.Tensor, ...]] = []  # per block, while KV caching
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """VAR's init: truncated normal with std sqrt(1/(3 width)); residual
        output projections shrunk by sqrt(2 depth); AdaLN gains (gamma) almost
        zero so every block starts close to the identity; small head so the
        first logits are near uniform (loss = log V)."""
        std = math.sqrt(1.0 / (3 * self.width))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.pos_embed, std=std)
        self.head.out.weight.mul_(0.02)
        self.head.ada_lin[-1].weight.mul_(0.5)
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            block.mlp.fc2.weight.div_(math.sqrt(2 * self.depth))
            ada = block.ada_lin[-1].weight
            ada[: 2 * self.width].mul_(1e-5)  # gamma1, gamma2
            ada[2 * self.width:].mul_(0.5)  # scales and shifts

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward_flops(self) -> int:
        """FLOPs of one teacher-forced forward of one image (a multiply-add is 2):
        the matrix products (as torch.utils.flop_counter counts them) and the
        attention, dense over all L positions (the block-causal mask saves no work
        in scaled_dot_product_attention); elementwise ops, norms and embedding
        look-ups are left out. A training step costs about 3x this per image
        (forward + backward)."""
        length, width = self.seq_len, self.width
        hidden = self.blocks[0].mlp.fc1.out_features if self.depth else 0
        block = (2 * width * 6 * width  # ada_lin, once per image
                 + 2 * length * width * 3 * width  # qkv
                 + 4 * length * length * width  # q k^T and attention @ v
                 + 2 * length * width * width  # proj
                 + 4 * length * width * hidden)  # fc1, fc2
        return (2 * (length - self.first_l) * self.latent_channels * width  # word_embed
                + self.depth * block
                + 2 * width * 2 * width + 2 * length * width * self.vocab_size)  # head

    def config(self) -> dict:
        """Constructor kwargs, as stored in checkpoints (``config``)."""
        return dict(self._config)

    def forward(self, labels: torch.Tensor, var_input: torch.Tensor) -> torch.Tensor:
        """Logits for every position: (B, l, V) with l = p_1^2 + var_input's length.

        ``var_input`` is the teacher-forcing input (B, L - p_1^2, C), or any
        prefix of it ending at a scale boundary (the no-cache sampling path).
        Labels equal to ``num_classes`` select the null class.
        """
        cond = self.class_emb(labels)
        x = torch.cat((self._start(cond), self.word_embed(var_input.float())), dim=1)
        end = x.shape[1]
        x = x + self.scale_embed(self.scale_ids[:end]) + self.pos_embed[:, :end]
        mask = self.attn_mask[:end, :end]
        for block in self.blocks:
            x = block(x, block.modulation(cond), mask)
        return self.head(x, self.head.modulation(cond))

    def _start(self, cond: torch.Tensor) -> torch.Tensor:
        return cond[:, None].expand(-1, self.first_l, -1) + self.pos_start

    # -- KV-cache sampling -------------------------------------------------

    def enable_kv_cache(self, enabled: bool) -> None:
        """Switch KV caching on or off; both clear the cache, so every
        generation starts with ``enable_kv_cache(True)`` and then calls
        ``forward_scale`` for k = 0, 1, ..., K-1 in order."""
        for block in self.blocks:
            block.attn.caching, block.attn.cache = enabled, None
        self._next_scale = 0
        self._modulations: list[tuple[torch.Tensor, ...]] = []

    def forward_scale(self, k: int, labels: torch.Tensor, x_k: torch.Tensor | None
                      ) -> torch.Tensor:
        """Logits (B, p_k^2, V) of scale k, feeding only that scale's tokens.

        ``x_k`` is scale k's teacher-forcing input (B, p_k^2, C) (None for
        k = 0, whose input is the start token). The cache holds the keys and
        values of scales < k, all of which scale k may attend to, so no mask
        is needed. ``labels`` are read at k = 0; the class's embedding and
        modulations are kept for the later scales of the same images.
        """
        if not self.blocks[0].attn.caching:
            raise RuntimeError("forward_scale needs enable_kv_cache(True) first")
        if k != self._next_scale:
            raise RuntimeError(f"forward_scale got scale {k}, expected {self._next_scale}")
        if k == 0:  # the class conditions every scale: its embedding and modulations once
            cond = self.class_emb(labels)
            self._modulations = [block.modulation(cond) for block in self.blocks] \
                + [self.head.modulation(cond)]
            x = self._start(cond)
        else:
            x = self.word_embed(x_k.float())
        begin, end = self.begin_ends[k]
        x = x + self.scale_embed.weight[k] + self.pos_embed[:, begin:end]
        for block, mod in zip(self.blocks, self._modulations[:-1], strict=True):
            x = block(x, mod, None)
        self._next_scale = k + 1
        return self.head(x, self._modulations[-1])


def compile_blocks(var: VAR, param: str) -> VAR:
    """``var`` with each transformer block under torch.compile, for ``param``
    (``train.compile``, ``sample.compile``). On the CPU the eager blocks spend about a
    third of a training step and half of a sampling batch outside the matrix products
    (GELU, norms, modulations, residuals, each a pass over memory); inductor fuses them.

    Blocks, not the whole model: the backward of the class and scale embeddings is a
    scatter-add, which inductor's C++ code runs with atomic adds across threads, so a
    whole compiled model trained twice from one seed differs in the last bits; the
    blocks hold no scatter, and compiled alone they are as fast (bench/train_step.py).
    Dynamic shapes: one graph per block serves every batch, scale length and cache
    length (training, evaluation and sampling), where static shapes would compile per
    shape, past dynamo's limit of 8 at VAR's 10 scales."""
    require_compiler(next(var.parameters()).device, param)
    for block in var.blocks:
        block.compile(dynamic=True)
    return var


def _load(path: str | Path, ema: bool) -> tuple[VAR, dict]:
    """A trained VAR in eval mode (the EMA weights when ``ema`` and present) and its file."""
    ckpt = load_torch(path, "VAR checkpoint")
    model = VAR(**ckpt["config"])
    state = ckpt["ema_state_dict"] if ema and ckpt.get("ema_state_dict") is not None \
        else ckpt["state_dict"]
    model.load_state_dict(state)
    return model.eval(), ckpt


def load_var_and_temperatures(path: str | Path, ema: bool = True
                              ) -> tuple[VAR, torch.Tensor | None]:
    """A trained VAR in eval mode (the EMA weights when ``ema`` and present) and
    its per-scale logit temperatures (K,): set by post-hoc temperature scaling
    (the `ts` variant), None for a model used as trained."""
    model, ckpt = _load(path, ema)
    return model, ckpt.get("logit_temperatures")


def load_var_for_sampling(path: str | Path, ema: bool = True
                          ) -> tuple[VAR, torch.Tensor | None, bool]:
    """:func:`load_var_and_temperatures`, and whether the tokens are drawn at the
    temperatures (the `ts` run's ``sample_at_temperatures``, saved with it; False
    without temperatures): a calibrator draws its base model's own samples."""
    model, ckpt = _load(path, ema)
    temperatures = ckpt.get("logit_temperatures")
    if temperatures is None:
        return model, None, False
    variant = ckpt.get("variant") or {}
    if "sample_at_temperatures" not in variant:
        raise StageError(f"VAR checkpoint {path} has logit temperatures but no "
                         "sample_at_temperatures (written before `ts` runs became calibrators): "
                         "rerun the train stage that writes it")
    return model, temperatures, bool(variant["sample_at_temperatures"])


def load_var(path: str | Path, ema: bool = True) -> VAR:
    """A trained VAR in eval mode; the EMA weights when ``ema`` and present."""
    return load_var_and_temperatures(path, ema)[0]
