"""The multi-scale residual VQ-VAE tokenizer (VAR's VQVAE, docs/method.md section 1).

An image becomes K token maps of growing side p_1 < ... < p_K: each scale
quantises what the coarser scales left unexplained, so a transformer can
predict the image coarse to fine. One codebook is shared by every scale, which
is what lets the transformer read every scale's tokens with one embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from up.core.io import load_torch
from up.models.var_vqvae import VarDecoder, VarEncoder

PHI_RATIO = 0.5  # phi(h) = (1 - r) h + r conv(h): VAR's quant_resi


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [-1, 1], the range every model of the project uses."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 pixels (clamped, rounded); inverse of to_float."""
    return images.detach().clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)


def index_dtype(vocab_size: int) -> torch.dtype:
    """The smallest integer dtype that holds every code index (token caches stay small)."""
    if vocab_size <= 256:
        return torch.uint8
    if vocab_size <= 32767:
        return torch.int16
    return torch.int32


def flatten_indices(indices: list[torch.Tensor]) -> torch.Tensor:
    """[(B, p_k, p_k)] -> (B, L): scales coarse to fine, each row-major."""
    return torch.cat([idx.flatten(1) for idx in indices], dim=1)


def split_indices(tokens: torch.Tensor,
                  patch_nums: list[int] | tuple[int, ...]) -> list[torch.Tensor]:
    """(B, L) -> [(B, p_k, p_k)] as int64; inverse of flatten_indices."""
    sizes = [p * p for p in patch_nums]
    if tokens.shape[1] != sum(sizes):
        raise ValueError(f"token rows have {tokens.shape[1]} entries, patch_nums "
                         f"{list(patch_nums)} need {sum(sizes)}")
    parts = torch.split(tokens.long(), sizes, dim=1)
    return [part.reshape(-1, p, p) for part, p in zip(parts, patch_nums, strict=True)]


def _groups(channels: int) -> int:
    """GroupNorm groups: about four channels per group, at most 32 groups."""
    return next(g for g in range(min(32, max(1, channels // 4)), 0, -1) if channels % g == 0)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """One stride-2 level per entry of ``widths``: image side / 2**len(widths) = latent side."""

    def __init__(self, in_channels: int, widths: list[int], res_blocks: int, latent_channels: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        ch = widths[0]
        for width in widths:
            for _ in range(res_blocks):
                layers.append(ResBlock(ch, width))
                ch = width
            layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        layers += [ResBlock(ch, ch), nn.GroupNorm(_groups(ch), ch), nn.SiLU(),
                   nn.Conv2d(ch, latent_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    """The encoder's mirror. Each level changes width with a conv at the lower
    resolution, then upsamples (nearest x2): the convs at full resolution run on
    the narrowest width, which keeps the decoder cheap on a CPU."""

    def __init__(self, latent_channels: int, widths: list[int], res_blocks: int, out_channels: int):
        super().__init__()
        ch = widths[-1]
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, ch, 3, padding=1), ResBlock(ch, ch)]
        for width in reversed(widths):
            layers += [nn.Conv2d(ch, width, 3, padding=1), nn.Upsample(scale_factor=2, mode="nearest")]
            ch = width
            layers += [ResBlock(ch, ch) for _ in range(res_blocks)]
        layers += [nn.GroupNorm(_groups(ch), ch), nn.SiLU(),
                   nn.Conv2d(ch, out_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.layers(f)


class Phi(nn.Module):
    """VAR's residual refinement of an upsampled code map: 0.5 h + 0.5 conv(h).

    Bicubic upsampling of a coarse map is blurry; phi lets each scale sharpen
    its contribution while staying close to the identity.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1.0 - PHI_RATIO) + self.conv(h) * PHI_RATIO


PHI_RULES = ("legacy", "var")


def phi_assignment(num_scales: int, phi_share: int, rule: str = "legacy") -> list[int]:
    """Which of ``phi_share`` phi convs serves each scale (VAR's PhiPartiallyShared).

    The convs sit at evenly spread ticks in [0, 1]; scale k (at k / (K - 1))
    uses the nearest one, so neighbouring scales share a conv when there are
    fewer convs than scales. ``rule`` says where the ticks are:

    - ``var``: VAR's own rule, which special-cases exactly 4 convs with ticks
      at 1/(3n) ... 1 - 1/(3n) (n convs) and uses 1/(2n) ... 1 - 1/(2n) for any
      other count; for 10 scales and 4 convs it gives [0,0,1,1,1,2,2,3,3,3].
      Needed to reproduce VAR's released VQ-VAE, and used by new tokenizers.
    - ``legacy``: 1/(2n) ... always (this project's first rule; for 10 scales
      and 4 convs [0,0,0,1,1,2,2,3,3,3]). Checkpoints saved before the rule
      was recorded used it, so it stays the default here and in
      ``load_tokenizer`` for configs without ``phi_rule``.

    The two differ only when phi_share == 4 (ties aside). The legacy ticks come from
    torch.linspace in float64 exactly as before (old checkpoints stay
    bit-identical); VAR's from numpy.linspace, with numpy's argmin tie-break
    (lowest conv), as VAR computes them.
    """
    if rule not in PHI_RULES:
        raise ValueError(f"unknown phi_rule {rule!r} ({' | '.join(PHI_RULES)})")
    where = [k / (num_scales - 1) if num_scales > 1 else 0.0 for k in range(num_scales)]
    if rule == "legacy":
        ticks = torch.linspace(1 / (2 * phi_share), 1 - 1 / (2 * phi_share), phi_share,
                               dtype=torch.float64)
        return [int(torch.argmin((ticks - at).abs())) for at in where]
    edge = 1 / 3 / phi_share if phi_share == 4 else 1 / 2 / phi_share
    var_ticks = np.linspace(edge, 1 - edge, phi_share)
    return [int(np.argmin(np.abs(var_ticks - at))) for at in where]


@dataclass
class Quantized:
    """What the quantiser computes for a latent map f (B, C, h, w)."""

    f_hats: list[torch.Tensor]  # f_hat after scales 1..k, for k = 1..K (grads: codebook, phi)
    indices: list[torch.Tensor]  # (B, p_k, p_k) int64 per scale
    residuals: torch.Tensor  # (N, C) every residual vector that was quantised (no grad)
    vq_loss: torch.Tensor  # codebook + beta * commitment, averaged over scales


def bicubic_matrix(size: int, side: int) -> torch.Tensor:
    """(side, size) matrix A with A @ x @ A.T == bicubic upsampling of x (size x size) to side.

    Read off torch's own bicubic kernel (align_corners=False, clamped borders),
    applied to unit impulses; as two matmuls its backward is far cheaper on a
    CPU than upsample_bicubic2d_backward for the tiny maps of the coarse scales.
    """
    impulses = torch.eye(size, dtype=torch.float64).view(size, 1, 1, size)
    return F.interpolate(impulses, size=(1, side), mode="bicubic").view(size, side).T.float()


class MultiScaleQuantizer(nn.Module):
    def __init__(self, vocab_size: int, channels: int, patch_nums: list[int], phi_share: int,
                 beta: float, phi_rule: str = "var"):
        super().__init__()
        self.patch_nums = tuple(patch_nums)
        self.side = self.patch_nums[-1]  # the latent map is p_K x p_K
        self.beta = beta
        for pn in self.patch_nums[:-1]:
            self.register_buffer(f"upsample_{pn}", bicubic_matrix(pn, self.side), persistent=False)
        self.embedding = nn.Embedding(vocab_size, channels)
        nn.init.uniform_(self.embedding.weight, -1.0 / vocab_size, 1.0 / vocab_size)
        self.phis = nn.ModuleList(Phi(channels) for _ in range(phi_share))
        self.phi_of_scale = phi_assignment(len(patch_nums), phi_share, phi_rule)

    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared L2) for each row of ``vectors`` (N, C)."""
        codes = self.embedding.weight.detach()
        dist = vectors.square().sum(1, keepdim=True) - 2.0 * vectors @ codes.T
        return torch.argmin(dist + codes.square().sum(1), dim=1)

    def contribution(self, k: int, idx: torch.Tensor) -> torch.Tensor:
        """Scale k's term of f_hat: codes looked up, bicubic-upsampled to p_K, phi-refined."""
        h = self.embedding(idx).permute(0, 3, 1, 2)
        if self.patch_nums[k] != self.side:
            up = getattr(self, f"upsample_{self.patch_nums[k]}")
            h = up @ h @ up.T
        return self.phis[self.phi_of_scale[k]](h.contiguous())

    def forward(self, f: torch.Tensor) -> Quantized:
        # Nearest-code search and residual sums in float32 even under bf16 autocast:
        # close distances would otherwise pick other codes (VAR does the same).
        with torch.autocast(f.device.type, enabled=False):
            return self._quantize(f.float())

    def _quantize(self, f: torch.Tensor) -> Quantized:
        batch, channels, side, _ = f.shape
        if f.shape[-2:] != (self.side, self.side):
            raise ValueError(f"latent map {tuple(f.shape)} is not {self.side} x {self.side}")
        f_rest = f.detach()
        f_hat = torch.zeros_like(f_rest)
        f_hats, indices, residuals = [], [], []
        vq_loss = f.new_zeros(())
        for k, pn in enumerate(self.patch_nums):
            rest = f_rest if pn == side else F.interpolate(f_rest, size=(pn, pn), mode="area")
            rest = rest.permute(0, 2, 3, 1).reshape(-1, channels)
            idx = self.nearest(rest).view(batch, pn, pn)
            h = self.contribution(k, idx)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            # codebook term (moves codes and phi) + commitment (moves the encoder)
            codebook = F.mse_loss(f_hat, f.detach())
            commitment = F.mse_loss(f_hat.detach(), f)
            vq_loss = vq_loss + codebook + self.beta * commitment
            f_hats.append(f_hat)
            indices.append(idx)
            residuals.append(rest)
        return Quantized(f_hats, indices, torch.cat(residuals), vq_loss / len(self.patch_nums))


@dataclass
class TokenizerOutput:
    recon: torch.Tensor  # decoded image from all K scales (unclamped)
    partial: torch.Tensor | None  # decoded image from the first partial_k scales (unclamped)
    quantized: Quantized


ARCHS = ("conv", "var")


class MultiScaleVQVAE(nn.Module):
    """Encoder -> multi-scale residual quantiser -> decoder.

    ``config`` holds the constructor kwargs, stored with the weights so that
    ``load_tokenizer`` rebuilds the model without params.yaml.

    ``arch`` picks the encoder/decoder: ``conv``, the project's small net
    (``widths``, one stride-2 level each), or ``var``, VAR's VQ-VAE net
    (up/models/var_vqvae.py: widths ``base_width * ch_mult``, ``len(ch_mult) - 1``
    stride-2 levels), which is what VAR's released weights load into.
    ``phi_rule`` (see phi_assignment) is recorded in ``config`` so a saved
    tokenizer always reloads with the rule it was trained with.
    """

    def __init__(self, in_channels: int = 1, widths: list[int] | tuple[int, ...] = (16, 32),
                 res_blocks: int = 1, latent_channels: int = 32, vocab_size: int = 512,
                 patch_nums: list[int] | tuple[int, ...] = (1, 2, 3, 4, 6, 8), phi_share: int = 6,
                 beta: float = 0.25, phi_rule: str = "var", arch: str = "conv",
                 base_width: int = 128, ch_mult: list[int] | tuple[int, ...] = (1, 1, 2, 2, 4)):
        super().__init__()
        if list(patch_nums) != sorted(set(patch_nums)):
            raise ValueError(f"patch_nums {list(patch_nums)} must be strictly increasing")
        if not 1 <= phi_share <= len(patch_nums):
            raise ValueError(f"phi_share={phi_share} must lie in 1..{len(patch_nums)}")
        if arch not in ARCHS:
            raise ValueError(f"unknown tokenizer arch {arch!r} ({' | '.join(ARCHS)})")
        shape = dict(widths=list(widths)) if arch == "conv" else {}
        self.config = dict(in_channels=in_channels, **shape, res_blocks=res_blocks,
                           latent_channels=latent_channels, vocab_size=vocab_size,
                           patch_nums=list(patch_nums), phi_share=phi_share, beta=beta,
                           phi_rule=phi_rule, arch=arch)
        self.patch_nums = tuple(patch_nums)
        self.vocab_size = vocab_size
        self.latent_channels = latent_channels
        self.arch = arch
        if arch == "conv":
            self.downsample = 2 ** len(widths)
            self.encoder = Encoder(in_channels, list(widths), res_blocks, latent_channels)
            self.decoder = Decoder(latent_channels, list(widths), res_blocks, in_channels)
        else:
            self.config.update(base_width=base_width, ch_mult=list(ch_mult))
            self.downsample = 2 ** (len(ch_mult) - 1)
            self.encoder = VarEncoder(in_channels, base_width, list(ch_mult), res_blocks,
                                      latent_channels)
            self.decoder = VarDecoder(latent_channels, base_width, list(ch_mult), res_blocks,
                                      in_channels)
        self.quantizer = MultiScaleQuantizer(vocab_size, latent_channels, list(patch_nums),
                                             phi_share, beta, phi_rule)

    @property
    def latent_side(self) -> int:
        return self.patch_nums[-1]

    def latent(self, images: torch.Tensor) -> torch.Tensor:
        f = self.encoder(images)
        if f.shape[-2:] != (self.latent_side, self.latent_side):
            raise ValueError(
                f"images of side {tuple(images.shape[-2:])} give a {tuple(f.shape[-2:])} latent; "
                f"the last of patch_nums {list(self.patch_nums)} must equal image side / "
                f"{self.downsample}")
        return f

    def forward(self, images: torch.Tensor, partial_k: int | None = None) -> TokenizerOutput:
        """Reconstruct ``images``; with ``partial_k`` also decode from the first k scales.

        Training uses the straight-through estimator (decoder gradients reach
        the encoder through f); the partial decode reads f_hat after k scales,
        whose gradients reach codebook and phi but not the encoder.
        """
        f = self.latent(images)
        q = self.quantizer(f)
        f_hat = q.f_hats[-1]
        if self.training:  # straight-through: forward value f_hat, gradient to f
            f_hat = f + (f_hat - f).detach()
        if partial_k is None:
            return TokenizerOutput(self.decoder(f_hat), None, q)
        if not 1 <= partial_k <= len(self.patch_nums):
            raise ValueError(f"partial_k={partial_k} outside 1..{len(self.patch_nums)}")
        both = self.decoder(torch.cat([f_hat, q.f_hats[partial_k - 1]]))
        recon, partial = both.chunk(2)
        return TokenizerOutput(recon, partial, q)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> K index maps (B, p_k, p_k), int64."""
        return self.quantizer(self.latent(images)).indices

    def indices_to_fhat(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """The accumulated f_hat (B, C, h, w) of the given scales (a prefix of patch_nums)."""
        if len(indices) > len(self.patch_nums):
            raise ValueError(f"{len(indices)} index maps for {len(self.patch_nums)} scales")
        f_hat = self.empty_fhat(indices[0].shape[0])
        for k, idx in enumerate(indices):
            if idx.shape[1:] != (self.patch_nums[k], self.patch_nums[k]):
                raise ValueError(f"scale {k} index map has shape {tuple(idx.shape)}, expected "
                                 f"(B, {self.patch_nums[k]}, {self.patch_nums[k]})")
            f_hat = f_hat + self.quantizer.contribution(k, idx.long())
        return f_hat

    def fhat_to_image(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decode an accumulated f_hat into images in [-1, 1]."""
        return self.decoder(f_hat).clamp(-1.0, 1.0)

    def decode(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """All K index maps -> images (B, C, H, W) in [-1, 1]."""
        if len(indices) != len(self.patch_nums):
            raise ValueError(f"decode needs {len(self.patch_nums)} index maps, got {len(indices)}")
        return self.fhat_to_image(self.indices_to_fhat(indices))

    def partial_decode(self, indices: list[torch.Tensor], k: int) -> torch.Tensor:
        """Images from the first k scales only: what the coarse tokens alone carry."""
        if not 1 <= k <= len(self.patch_nums):
            raise ValueError(f"k={k} outside 1..{len(self.patch_nums)}")
        return self.fhat_to_image(self.indices_to_fhat(indices[:k]))

    def indices_to_var_input(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input (B, L - p_1^2, C) of the transformer (VAR's idxBl_to_var_input).

        For k = 1..K-1: f_hat after scales 1..k, area-downsampled to p_{k+1},
        flattened row-major; exactly what sampling builds with next_var_input.
        """
        f_hat = self.empty_fhat(indices[0].shape[0])
        inputs = [f_hat.new_zeros(len(f_hat), 0, self.latent_channels)]
        for k in range(len(self.patch_nums) - 1):
            f_hat, nxt = self.next_var_input(k, f_hat, indices[k])
            inputs.append(nxt)
        return torch.cat(inputs, dim=1)

    def empty_fhat(self, batch: int) -> torch.Tensor:
        """The f_hat (B, C, p_K, p_K) before any scale: zeros on the model's device."""
        side = self.latent_side
        return self.quantizer.embedding.weight.new_zeros(batch, self.latent_channels, side, side)

    def next_var_input(self, k: int, f_hat: torch.Tensor,
                       idx_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add scale k's (0-based) tokens to f_hat; return it and the next scale's input.

        The input is (B, p_{k+1}^2, C), or None after the last scale
        (VAR's get_next_autoregressive_input).
        """
        f_hat = f_hat + self.quantizer.contribution(k, idx_k.long())
        if k == len(self.patch_nums) - 1:
            return f_hat, None
        pn = self.patch_nums[k + 1]
        nxt = f_hat if pn == self.latent_side else F.interpolate(f_hat, size=(pn, pn), mode="area")
        return f_hat, nxt.flatten(2).transpose(1, 2)


def tokenize_images(model: MultiScaleVQVAE, images: torch.Tensor, batch_size: int,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images (N, C, H, W) -> token rows (N, L) in the smallest dtype that fits V."""
    dtype = index_dtype(model.vocab_size)
    rows = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = to_float(images[start:start + batch_size]).to(device)
            rows.append(flatten_indices(model.encode(x)).cpu().to(dtype))
    return torch.cat(rows)


def load_tokenizer(path: str | Path,
                   device: torch.device | str = "cpu") -> MultiScaleVQVAE:
    """The trained tokenizer, in eval mode with frozen weights (it is never trained further)."""
    saved = load_torch(path, "tokenizer")
    # checkpoints from before the rule was recorded used the legacy phi rule
    model = MultiScaleVQVAE(**{"phi_rule": "legacy", **saved["config"]})
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval().requires_grad_(False)


def load_code_clusters(path: str | Path) -> tuple[torch.Tensor, int]:
    """(code_to_cluster int64 (V,), num_clusters): the codebook's semantic groups."""
    saved = load_torch(path, "tokenizer")
    return saved["code_to_cluster"].long(), int(saved["num_clusters"])
