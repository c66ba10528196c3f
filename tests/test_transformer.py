"""The VAR transformer: block-causal mask, KV cache, size, checkpoint loading."""

import pytest
import torch

from up.core.io import save_torch
from up.models.transformer import VAR, load_var

PATCH_NUMS = (1, 2, 3, 4)
V, C, CLASSES = 16, 8, 5


def tiny(**kwargs) -> VAR:
    torch.manual_seed(0)
    model = VAR(V, C, PATCH_NUMS, CLASSES, depth=2, width=32, heads=4, **kwargs)
    # VAR's init makes every block an identity map (AdaLN gains ~1e-5): perturb
    # all weights so that attention actually carries information between tokens.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def test_layout_and_scale_ids():
    model = tiny()
    assert model.seq_len == 1 + 4 + 9 + 16 == 30
    assert model.scale_ids.tolist() == [0] + [1] * 4 + [2] * 9 + [3] * 16
    assert model.begin_ends == [(0, 1), (1, 5), (5, 14), (14, 30)]
    labels = torch.tensor([0, CLASSES])  # a class and the null class
    logits = model(labels, torch.randn(2, model.seq_len - 1, C))
    assert logits.shape == (2, 30, V) and logits.dtype == torch.float32


@pytest.mark.parametrize("qk_norm", [True, False])
def test_block_causal_mask(qk_norm):
    """Changing scale k's input changes no logit of scales < k and some of every scale >= k."""
    model = tiny(qk_norm=qk_norm)
    labels = torch.tensor([1, 3])
    x = torch.randn(2, model.seq_len - 1, C)
    base = model(labels, x)
    for k in range(1, len(PATCH_NUMS)):
        begin, end = model.begin_ends[k]
        changed = x.clone()
        changed[:, begin - 1] += 1.0  # first token of scale k (var_input skips the start)
        out = model(labels, changed)
        diff = (out - base).abs().amax(dim=(0, 2))  # per position
        assert torch.all(diff[:begin] == 0), f"scale {k} leaked into coarser scales"
        for j in range(k, len(PATCH_NUMS)):
            b, e = model.begin_ends[j]
            assert diff[b:e].max() > 1e-4, f"scale {k} does not reach scale {j}"


def test_class_conditions_every_position():
    model = tiny()
    x = torch.randn(1, model.seq_len - 1, C).expand(2, -1, -1)
    out = model(torch.tensor([0, 1]), x)
    assert (out[0] - out[1]).abs().amax(-1).min() > 1e-4


def test_kv_cache_matches_full_forward():
    model = tiny()
    labels = torch.tensor([2, 4, CLASSES])
    x = torch.randn(3, model.seq_len - 1, C)
    full = model(labels, x)
    model.enable_kv_cache(True)
    try:
        for k, (begin, end) in enumerate(model.begin_ends):
            x_k = None if k == 0 else x[:, begin - 1:end - 1]
            logits = model.forward_scale(k, labels, x_k)
            torch.testing.assert_close(logits, full[:, begin:end], rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="expected 4"):
            model.forward_scale(1, labels, x[:, :4])
    finally:
        model.enable_kv_cache(False)
    assert all(block.attn.cache is None for block in model.blocks)


def test_prefix_forward_matches_full_forward():
    """The no-cache sampling path runs forward on a prefix ending at a scale boundary."""
    model = tiny()
    labels = torch.tensor([0, 1])
    x = torch.randn(2, model.seq_len - 1, C)
    full = model(labels, x)
    torch.testing.assert_close(model(labels, x[:, :13]), full[:, :14])
    torch.testing.assert_close(model(labels, x[:, :0]), full[:, :1])


def test_initial_logits_near_uniform():
    """Small-gain init: the untrained model predicts ~uniform codes (loss ~ log V)."""
    torch.manual_seed(0)
    model = VAR(64, C, PATCH_NUMS, CLASSES, depth=2, width=32, heads=4)
    logits = model(torch.tensor([0, 1]), torch.randn(2, model.seq_len - 1, C))
    assert logits.abs().max() < 0.5


def test_drop_path_only_in_training():
    model = tiny(drop_path=0.5)
    assert [b.drop_path.p for b in model.blocks] == [0.0, 0.5]
    labels, x = torch.tensor([0, 1, 2, 3]), torch.randn(4, model.seq_len - 1, C)
    torch.testing.assert_close(model(labels, x), model(labels, x))
    model.train()
    torch.manual_seed(1)
    assert not torch.equal(model(labels, x), model(labels, x))


def test_var_d16_parameter_count():
    """VAR-d16 (VAR's ImageNet 256 model) has 310M parameters; built without memory."""
    with torch.device("meta"):
        model = VAR(4096, 32, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 1000, depth=16, width=1024,
                    heads=16, mlp_ratio=4.0)
    assert model.seq_len == 680
    assert abs(model.num_parameters() / 310e6 - 1) < 0.02


def test_load_var_prefers_ema(tmp_path):
    model = tiny()
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    ckpt = dict(config=model.config(), state_dict=model.state_dict(), ema_state_dict=ema,
                variant={"loss": "ce"}, temperatures=None, step=3)
    save_torch(ckpt, tmp_path / "var.pt")
    loaded = load_var(tmp_path / "var.pt")
    assert not loaded.training
    torch.testing.assert_close(loaded.pos_embed, model.pos_embed + 1)
    raw = load_var(tmp_path / "var.pt", ema=False)
    torch.testing.assert_close(raw.pos_embed, model.pos_embed)
    save_torch({**ckpt, "ema_state_dict": None}, tmp_path / "var.pt")
    torch.testing.assert_close(load_var(tmp_path / "var.pt").pos_embed, model.pos_embed)
    assert VAR(**model.config()).config() == model.config()
