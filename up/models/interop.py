"""Import and export of VAR's own checkpoints (FoundationVision/VAR).

VAR releases a VQ-VAE (``vae_ch160v4096z32.pth``) and transformers
(``var_d16.pth`` ... ``var_d30.pth``) as plain state dicts under its own key
names. Our tokenizer (``arch: var``) and transformer compute the same
functions with differently named modules, so both directions are a renaming
plus a few buffers VAR keeps in its state dicts and we rebuild (the
attention mask, the scale id of each position, a zero key bias, the VQ-VAE's
code-usage statistics).

Every size is inferred from the shapes (depth, width, heads, V, C, the VQ-VAE
widths, multipliers and residual blocks; the scale layout from VAR's
``lvl_1L`` buffer), and a state dict is accepted only if it has exactly the
keys and shapes our model of that size exports: the first missing,
unexpected or mis-shaped key is named in a StageError.

`select_class_rows` cuts a transformer's class embedding to a subset of its
classes (fine-tuning a released ImageNet model on fewer classes).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch

from up.core.errors import StageError
from up.models.tokenizer import MultiScaleVQVAE
from up.models.transformer import VAR

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR's 256 px scale layout

Shapes = dict[str, tuple[int, ...]]


# -- shapes and validation ------------------------------------------------------

def shapes_of(state: Mapping) -> Shapes:
    """key -> shape of a state dict, or of a manifest (key -> list of ints)."""
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in state.items()}


def check_shapes(expected: Shapes, got: Mapping, what: str) -> None:
    """Raise a StageError naming the first key missing from ``got``, the first
    mis-shaped one (in ``expected``'s order), or the first unexpected one."""
    got_shapes = shapes_of(got)
    for key, shape in expected.items():
        if key not in got_shapes:
            raise StageError(f"{what}: missing key {key!r} (expected shape {list(shape)})")
        if got_shapes[key] != shape:
            raise StageError(f"{what}: key {key!r} has shape {list(got_shapes[key])}, "
                             f"expected {list(shape)}")
    for key in got_shapes:
        if key not in expected:
            raise StageError(f"{what}: unexpected key {key!r} (shape {list(got_shapes[key])})")


def _need(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise StageError(f"{what}: missing key {key!r}; is this a VAR state dict?")
    return shapes[key]


def _count(shapes: Shapes, pattern: str) -> int:
    """Number of distinct i in keys matching ``pattern`` (a regex with one group)."""
    found = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


# -- the VQ-VAE -----------------------------------------------------------------

def _vae_key_to_var(key: str, phi_share: int) -> str:
    """Our tokenizer key -> VAR's VQVAE key (tokenizer arch ``var``)."""
    if key.startswith("encoder.quant_conv."):
        return key.removeprefix("encoder.")
    if key.startswith("decoder.post_quant_conv."):
        return key.removeprefix("decoder.")
    if key == "quantizer.embedding.weight":
        return "quantize.embedding.weight"
    if m := re.fullmatch(r"quantizer\.phis\.(\d+)\.conv\.(weight|bias)", key):
        holder = "qresi" if phi_share == 1 else f"qresi_ls.{m.group(1)}"
        return f"quantize.quant_resi.{holder}.{m.group(2)}"
    if key.startswith(("encoder.", "decoder.")):
        return key
    raise KeyError(f"tokenizer key {key!r} has no VAR counterpart")


def _vae_rank(key: str) -> int:
    """VAR's VQVAE.state_dict() order: encoder, decoder, quantize, quant convs."""
    for rank, prefix in enumerate(("encoder.", "decoder.", "quantize.ema_vocab_hit_SV",
                                   "quantize.quant_resi.", "quantize.embedding.",
                                   "quant_conv.", "post_quant_conv.")):
        if key.startswith(prefix):
            return rank
    return 99


def export_vae(model: MultiScaleVQVAE) -> dict[str, torch.Tensor]:
    """Our ``arch: var`` tokenizer -> a state dict that VAR's VQVAE loads
    strictly. VAR's code-usage statistics (``ema_vocab_hit_SV``, used only
    while VAR trains its VQ-VAE) are exported as zeros."""
    if model.arch != "var":
        raise StageError(f"only a tokenizer with arch 'var' can be exported to VAR "
                         f"(this one has arch {model.arch!r})")
    phi_share = len(model.quantizer.phis)
    out = {_vae_key_to_var(k, phi_share): v.detach()
           for k, v in model.state_dict().items()}
    weight = model.quantizer.embedding.weight
    out["quantize.ema_vocab_hit_SV"] = torch.zeros(len(model.patch_nums), model.vocab_size,
                                                   device=weight.device, dtype=weight.dtype)
    return dict(sorted(out.items(), key=lambda kv: _vae_rank(kv[0])))  # stable: keeps order


def infer_vae_config(state: Mapping, patch_nums=None) -> dict:
    """MultiScaleVQVAE kwargs (arch ``var``) of a VAR VQVAE state dict.

    ``patch_nums`` cannot be read from a VQ-VAE (only its scale count, from
    ``ema_vocab_hit_SV``): pass the transformer's, else VAR's default is used.
    """
    what = "VAR VQ-VAE state dict"
    shapes = shapes_of(state)
    base_width, in_channels = _need(shapes, "encoder.conv_in.weight", what)[:2]
    levels = _count(shapes, r"encoder\.down\.(\d+)\.")
    res_blocks = _count(shapes, r"encoder\.down\.0\.block\.(\d+)\.")
    if levels == 0 or res_blocks == 0:
        raise StageError(f"{what}: no encoder.down.*.block.* keys; is this a VAR VQ-VAE?")
    ch_mult = []
    for i in range(levels):
        width = _need(shapes, f"encoder.down.{i}.block.0.conv1.weight", what)[0]
        if width % base_width:
            raise StageError(f"{what}: encoder.down.{i} width {width} is not a multiple of "
                             f"the base width {base_width}")
        ch_mult.append(width // base_width)
    vocab_size, latent_channels = _need(shapes, "quantize.embedding.weight", what)
    phi_share = _count(shapes, r"quantize\.quant_resi\.qresi_ls\.(\d+)\.")
    if phi_share == 0 and "quantize.quant_resi.qresi.weight" in shapes:
        phi_share = 1
    if phi_share == 0:
        raise StageError(f"{what}: no quantize.quant_resi.qresi_ls.* keys (phi convs)")
    scales = _need(shapes, "quantize.ema_vocab_hit_SV", what)[0]
    patch_nums = list(VAR_PATCH_NUMS if patch_nums is None else patch_nums)
    if len(patch_nums) != scales:
        raise StageError(f"{what}: quantize.ema_vocab_hit_SV has {scales} scales, patch_nums "
                         f"{patch_nums} has {len(patch_nums)}")
    if phi_share > len(patch_nums):
        raise StageError(f"{what}: {phi_share} phi convs for {len(patch_nums)} scales")
    return dict(arch="var", in_channels=in_channels, base_width=base_width, ch_mult=ch_mult,
                res_blocks=res_blocks, latent_channels=latent_channels, vocab_size=vocab_size,
                patch_nums=patch_nums, phi_share=phi_share, beta=0.25, phi_rule="var")


def build_vae(config: dict, device: torch.device | str = "cpu") -> MultiScaleVQVAE:
    with torch.device(device):
        return MultiScaleVQVAE(**config)


def import_vae(state: Mapping, patch_nums=None) -> MultiScaleVQVAE:
    """A VAR VQVAE state dict -> our tokenizer (eval mode, frozen), after
    checking every key and shape against what that size exports."""
    config = infer_vae_config(state, patch_nums)
    model = build_vae(config)
    expected = export_vae(model)
    check_shapes(shapes_of(expected), state, "VAR VQ-VAE state dict")
    phi_share = config["phi_share"]
    ours = {k: state[_vae_key_to_var(k, phi_share)] for k in model.state_dict()}
    model.load_state_dict(ours)
    return model.eval().requires_grad_(False)


# -- the transformer ------------------------------------------------------------

_VAR_BLOCK = {
    "attn.qkv.weight": "attn.mat_qkv.weight",
    "attn.log_scale": "attn.scale_mul_1H11",
    "mlp.fc1.weight": "ffn.fc1.weight", "mlp.fc1.bias": "ffn.fc1.bias",
    "mlp.fc2.weight": "ffn.fc2.weight", "mlp.fc2.bias": "ffn.fc2.bias",
}
_VAR_TOP = {
    "scale_embed.weight": "lvl_embed.weight", "pos_embed": "pos_1LC",
    "head.ada_lin.1.weight": "head_nm.ada_lin.1.weight",
    "head.ada_lin.1.bias": "head_nm.ada_lin.1.bias",
    "head.out.weight": "head.weight", "head.out.bias": "head.bias",
}


def _var_key_to_var(key: str) -> str:
    """Our transformer key -> VAR's key."""
    if key in _VAR_TOP:
        return _VAR_TOP[key]
    if m := re.fullmatch(r"(blocks\.\d+\.)(.+)", key):
        return m.group(1) + _VAR_BLOCK.get(m.group(2), m.group(2))
    return key


def _var_rank(key: str) -> tuple[int, int]:
    """VAR's VAR.state_dict() order (parameters and buffers as it registers them)."""
    top = ["pos_start", "pos_1LC", "lvl_1L", "attn_bias_for_masking", "word_embed.",
           "class_emb.", "lvl_embed.", "blocks.", "head_nm.", "head."]
    for rank, prefix in enumerate(top):
        if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
            if prefix == "blocks.":
                block, rest = key.split(".")[1], key.split(".", 2)[2]
                order = ["attn.scale_mul_1H11", "attn.q_bias", "attn.v_bias", "attn.zero_k_bias",
                         "attn.mat_qkv.", "attn.proj.", "ffn.fc1.", "ffn.fc2.", "ada_lin."]
                sub = next(i for i, p in enumerate(order) if rest.startswith(p))
                return rank, int(block) * 100 + sub
            return rank, 0
    return 99, 0


def export_var(model: VAR) -> dict[str, torch.Tensor]:
    """Our transformer -> a state dict that VAR's ``VAR`` (attn_l2_norm=True,
    shared_aln=False) loads strictly, with the buffers VAR saves."""
    if not model.config()["qk_norm"]:
        raise StageError("only a transformer with qk_norm: true can be exported: VAR without "
                         "attn_l2_norm scales attention logits differently")
    out = {_var_key_to_var(k): v.detach() for k, v in model.state_dict().items()}
    ref = model.pos_embed
    L = model.seq_len
    scale_ids = torch.cat([torch.full((p * p,), k, dtype=torch.int64)
                           for k, p in enumerate(model.patch_nums)])
    out["lvl_1L"] = scale_ids.view(1, L).to(ref.device)
    bias = torch.zeros(L, L).masked_fill(scale_ids[:, None] < scale_ids[None, :], -torch.inf)
    out["attn_bias_for_masking"] = bias.view(1, 1, L, L).to(device=ref.device, dtype=ref.dtype)
    for i in range(model.depth):
        out[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(model.width, device=ref.device,
                                                          dtype=ref.dtype)
    return dict(sorted(out.items(), key=lambda kv: _var_rank(kv[0])))


def _patch_nums_from_lvl(state: Mapping, L: int, K: int, what: str) -> list[int]:
    lvl = state.get("lvl_1L")
    if isinstance(lvl, torch.Tensor) and lvl.device.type != "meta":
        counts = torch.bincount(lvl.flatten().long(), minlength=K).tolist()
        patch_nums = [math.isqrt(c) for c in counts]
        if any(p * p != c for p, c in zip(patch_nums, counts, strict=True)) or len(counts) != K:
            raise StageError(f"{what}: lvl_1L does not describe square scales ({counts})")
        return patch_nums
    if L == sum(p * p for p in VAR_PATCH_NUMS) and K == len(VAR_PATCH_NUMS):
        return list(VAR_PATCH_NUMS)
    raise StageError(f"{what}: cannot tell the scale layout of {K} scales / {L} positions "
                     f"without the lvl_1L buffer")


def infer_var_config(state: Mapping) -> dict:
    """Our VAR kwargs (depth, width, heads, V, C, patch_nums, classes, MLP
    ratio) read off a VAR transformer state dict's shapes."""
    what = "VAR transformer state dict"
    shapes = shapes_of(state)
    if any(k.endswith("ada_gss") or k.startswith("shared_ada_lin") for k in shapes):
        raise StageError(f"{what}: shared AdaLN (shared_aln=True) is not supported")
    rows, width = _need(shapes, "class_emb.weight", what)
    depth = _count(shapes, r"blocks\.(\d+)\.")
    if depth == 0:
        raise StageError(f"{what}: no blocks.* keys")
    if "blocks.0.attn.scale_mul_1H11" not in shapes:
        raise StageError(f"{what}: missing key 'blocks.0.attn.scale_mul_1H11': only VAR with "
                         f"attn_l2_norm=True (as released) is supported")
    heads = _need(shapes, "blocks.0.attn.scale_mul_1H11", what)[1]
    hidden = _need(shapes, "blocks.0.ffn.fc1.weight", what)[0]
    vocab_size = _need(shapes, "head.weight", what)[0]
    latent_channels = _need(shapes, "word_embed.weight", what)[1]
    L = _need(shapes, "pos_1LC", what)[1]
    K = _need(shapes, "lvl_embed.weight", what)[0]
    patch_nums = _patch_nums_from_lvl(state, L, K, what)
    return dict(vocab_size=vocab_size, latent_channels=latent_channels, patch_nums=patch_nums,
                num_classes=rows - 1, depth=depth, width=width, heads=heads,
                mlp_ratio=hidden / width, drop_path=0.0, qk_norm=True)


def build_var(config: dict, device: torch.device | str = "cpu") -> VAR:
    with torch.device(device):
        return VAR(**config)


def import_var(state: Mapping) -> VAR:
    """A VAR transformer state dict -> our VAR (eval mode), every key and
    shape checked. VAR's buffers must be what VAR itself builds for that
    layout (a different mask would mean a different model)."""
    what = "VAR transformer state dict"
    config = infer_var_config(state)
    model = build_var(config)
    expected = export_var(model)
    check_shapes(shapes_of(expected), state, what)
    for key in ("lvl_1L", "attn_bias_for_masking"):
        if not torch.equal(state[key].to(expected[key].dtype), expected[key]):
            raise StageError(f"{what}: buffer {key!r} differs from VAR's block-causal layout "
                             f"for patch_nums {config['patch_nums']}")
    ours = {k: state[_var_key_to_var(k)] for k in model.state_dict()}
    model.load_state_dict(ours)
    return model.eval()


# -- a subset of the classes ----------------------------------------------------

def check_class_rows(rows: Sequence, classes: int) -> list[int]:
    """``rows`` as a list of ints, each a class row 0..classes-1 and none twice;
    else a one-line StageError naming the first bad entry."""
    if len(rows) == 0:
        raise StageError("--class-rows: no class rows given")
    seen: set[int] = set()
    for row in rows:
        if isinstance(row, bool) or not isinstance(row, int):
            raise StageError(f"--class-rows: {row!r} is not an integer class index")
        if not 0 <= row < classes:
            raise StageError(f"--class-rows: class index {row} is out of range: the class "
                             f"embedding has classes 0..{classes - 1} (row {classes} is the "
                             f"null class, kept last)")
        if row in seen:
            raise StageError(f"--class-rows: class index {row} is listed more than once")
        seen.add(row)
    return list(rows)


def select_class_rows(state: Mapping, rows: Sequence[int]) -> dict:
    """VAR's transformer state dict with its class embedding cut to ``rows``:
    label i of the result is row ``rows[i]`` of ``state`` and the null class
    (the last row) stays last, so `import_var` infers ``num_classes =
    len(rows)``. Every other entry is ``state``'s own tensor, in its order."""
    what = "VAR transformer state dict"
    weight = state.get("class_emb.weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise StageError(f"{what}: missing key 'class_emb.weight'; is this a VAR state dict?")
    classes = weight.shape[0] - 1
    keep = check_class_rows(rows, classes) + [classes]
    cut = weight.index_select(0, torch.tensor(keep, dtype=torch.int64, device=weight.device))
    return {k: cut if k == "class_emb.weight" else v for k, v in state.items()}


def check_pair(tokenizer: MultiScaleVQVAE, var: VAR) -> None:
    """The transformer reads the tokenizer's codes: V, C and scales must agree."""
    mine = (tokenizer.vocab_size, tokenizer.latent_channels, tuple(tokenizer.patch_nums))
    theirs = (var.vocab_size, var.latent_channels, tuple(var.patch_nums))
    if mine != theirs:
        raise StageError(f"VQ-VAE (V, C, patch_nums) = {mine} but transformer has {theirs}")
