"""VAR's VQ-VAE encoder and decoder (``tokenizer.arch: var``).

The released VAR tokenizer (``vae_ch160v4096z32.pth``) is the taming /
latent-diffusion "vq-f16" conv net: ``len(ch_mult)`` resolution levels with
``res_blocks`` residual blocks each, stride-2 downsampling between levels,
single-head spatial self-attention at the lowest resolution and in the
middle, GroupNorm(32, eps 1e-6) everywhere, and a 3x3 ``quant_conv`` /
``post_quant_conv`` on the latent. Our implementation keeps the submodule
names of that layout (``conv_in``, ``down.i.block.j``, ``mid.attn_1``, ...)
so that importing and exporting weights is a renaming of a few prefixes
(up/models/interop.py), not a reshuffle; the latent convs live inside our encoder
(last op) and decoder (first op) because MultiScaleVQVAE calls only
``encoder`` and ``decoder`` around its quantiser.

Unlike the project's small ``conv`` arch, its widths are ``base_width *
ch_mult[i]`` and the image side shrinks by ``2 ** (len(ch_mult) - 1)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GN_GROUPS = 32
GN_EPS = 1e-6


def _norm(channels: int) -> nn.GroupNorm:
    if channels % GN_GROUPS:
        raise ValueError(f"VAR's VQ-VAE needs widths divisible by {GN_GROUPS}, got {channels}")
    return nn.GroupNorm(GN_GROUPS, channels, eps=GN_EPS)


class VarResBlock(nn.Module):
    """norm -> SiLU -> conv, twice, plus a (1x1 when widths change) skip."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class VarAttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, 3, C, H * W).transpose(2, 3).unbind(1)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one row/column at the bottom/right only
    (so even sides halve exactly, as in VAR)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (res blocks), ``attn`` (empty except at
    the lowest resolution) and an optional resampling conv."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Middle(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1 = VarResBlock(ch, ch)
        self.attn_1 = VarAttnBlock(ch)
        self.block_2 = VarResBlock(ch, ch)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class VarEncoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent f (B, latent_channels, H / 2**(n-1), ...).

    Ends with ``quant_conv`` (VAR applies it between encoder and quantiser).
    """

    def __init__(self, in_channels: int, base_width: int, ch_mult: list[int], res_blocks: int,
                 latent_channels: int, quant_conv_ks: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, base_width, 3, padding=1)
        ch, last = base_width, len(ch_mult) - 1
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            width = base_width * mult
            blocks, attns = [], []
            for _ in range(res_blocks):
                blocks.append(VarResBlock(ch, width))
                ch = width
                if i == last:
                    attns.append(VarAttnBlock(ch))
            level = _Level(blocks, attns)
            if i != last:
                level.downsample = Downsample(ch)
            self.down.append(level)
        self.mid = _Middle(ch)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(latent_channels, latent_channels, quant_conv_ks,
                                    padding=quant_conv_ks // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        return self.quant_conv(h)


class VarDecoder(nn.Module):
    """Latent f_hat -> image; starts with ``post_quant_conv``.

    ``up[i]`` is the level at resolution i (0 = full size), as in VAR's
    state dicts, though it runs from the coarsest level down; each level has
    ``res_blocks + 1`` blocks and, except the finest, ends with an upsample.
    """

    def __init__(self, latent_channels: int, base_width: int, ch_mult: list[int],
                 res_blocks: int, out_channels: int, quant_conv_ks: int = 3):
        super().__init__()
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, quant_conv_ks,
                                         padding=quant_conv_ks // 2)
        last = len(ch_mult) - 1
        ch = base_width * ch_mult[last]
        self.conv_in = nn.Conv2d(latent_channels, ch, 3, padding=1)
        self.mid = _Middle(ch)
        levels: list[_Level] = []
        for i in reversed(range(len(ch_mult))):
            width = base_width * ch_mult[i]
            blocks, attns = [], []
            for _ in range(res_blocks + 1):
                blocks.append(VarResBlock(ch, width))
                ch = width
                if i == last:
                    attns.append(VarAttnBlock(ch))
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(ch)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(f)))
        for level in reversed(self.up):
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
