"""Multi-scale VQ-VAE: quantiser invariants, round trips, reproducibility, resume, stages."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.project import params_from_yaml, save_prepared
from up.core.errors import StageError
from up.core.io import load_torch, save_torch
from up.core.params import Params, TokenizerParams
from up.core.runtime import setup
from up.data.splits import load_token_arrays
from up.models.tokenizer import (
    MultiScaleVQVAE,
    bicubic_matrix,
    flatten_indices,
    index_dtype,
    load_code_clusters,
    load_tokenizer,
    phi_assignment,
    split_indices,
    to_float,
    to_uint8,
    tokenize_images,
)
from up.training.tokenizer import (
    build_tokenizer,
    cluster_codebook,
    evaluate_tokenizer,
    psnr,
    reseed_dead_codes,
    train_tokenizer,
)

TINY = params_from_yaml(tokenizer=dict(
    downsample=2, widths=[8], latent_channels=4, vocab_size=16, patch_nums=[1, 2, 4], phi_share=2,
    semantic_clusters=4, steps=6, batch_size=8, lr=3e-3, warmup_steps=2, save_every=2,
    reseed_every=2, reseed_until=1.0, reseed_threshold=1.5, grid_images=3)).tokenizer


def tiny_model() -> MultiScaleVQVAE:
    return build_tokenizer(TINY, in_channels=1)


def tiny_images(n: int = 24, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8)


def make_phi_identity(model: MultiScaleVQVAE) -> None:
    """Centre-tap identity kernels: phi(h) = 0.5 h + 0.5 h = h."""
    with torch.no_grad():
        for phi in model.quantizer.phis:
            phi.conv.weight.zero_()
            phi.conv.bias.zero_()
            for c in range(phi.conv.weight.shape[0]):
                phi.conv.weight[c, c, 1, 1] = 1.0


def test_uint8_float_round_trip():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_float(pixels)
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(to_uint8(x), pixels)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 0.0, 3.0])), torch.tensor([0, 128, 255],
                                                                               dtype=torch.uint8))


def test_index_dtype_and_flatten_split():
    assert index_dtype(256) == torch.uint8
    assert index_dtype(257) == torch.int16
    assert index_dtype(32767) == torch.int16
    assert index_dtype(32768) == torch.int32
    maps = [torch.full((2, p, p), p) for p in (1, 2, 3)]
    maps[2][1, 0, 2] = 7
    flat = flatten_indices(maps)
    assert flat.shape == (2, 1 + 4 + 9)
    assert flat[1, 5 + 2].item() == 7  # scale 3 starts at 1 + 4; (0, 2) is its 3rd entry
    back = split_indices(flat.to(torch.uint8), [1, 2, 3])
    assert all(torch.equal(a, b) and b.dtype == torch.int64 for a, b in zip(maps, back,
                                                                            strict=True))
    with pytest.raises(ValueError):
        split_indices(flat, [1, 2])


def test_phi_assignment_spreads_convs_over_scales():
    assert phi_assignment(6, 6) == [0, 1, 2, 3, 4, 5]
    assert phi_assignment(6, 1) == [0] * 6
    # ticks 1/8, 3/8, 5/8, 7/8 against scale positions k/9
    assert phi_assignment(10, 4) == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert phi_assignment(1, 1) == [0]


@pytest.mark.parametrize("size", [1, 2, 3, 6])
def test_bicubic_matrix_is_torch_bicubic(size):
    x = torch.randn(2, 3, size, size)
    up = bicubic_matrix(size, 8)
    expected = torch.nn.functional.interpolate(x, size=(8, 8), mode="bicubic")
    torch.testing.assert_close(up @ x @ up.T, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(up.sum(1), torch.ones(8))  # rows are interpolation weights


def test_index_maps_have_scale_shapes_and_valid_values():
    model = tiny_model().eval()
    indices = model.encode(to_float(tiny_images(5)))
    assert [tuple(i.shape) for i in indices] == [(5, 1, 1), (5, 2, 2), (5, 4, 4)]
    assert all(i.dtype == torch.int64 and i.min() >= 0 and i.max() < 16 for i in indices)


def test_tokenize_images_is_batch_independent_and_compact():
    model = tiny_model().eval()
    images = tiny_images(7)
    tokens = tokenize_images(model, images, batch_size=3)
    assert tokens.dtype == torch.uint8 and tokens.shape == (7, 1 + 4 + 16)
    assert torch.equal(tokens, tokenize_images(model, images, batch_size=100))
    expected = flatten_indices(model.encode(to_float(images)))
    assert torch.equal(tokens.long(), expected)


def test_codebook_latent_leaves_zero_residual_after_first_scale():
    model = tiny_model().eval()
    make_phi_identity(model)
    code = model.quantizer.embedding.weight[5].detach()
    f = code.view(1, -1, 1, 1).expand(2, -1, 4, 4).contiguous()
    q = model.quantizer(f)
    assert (q.indices[0] == 5).all()
    torch.testing.assert_close(q.f_hats[0], f, atol=1e-6, rtol=0)  # residual f - f_hat ~ 0


def test_single_full_resolution_scale_is_exact_lookup():
    model = MultiScaleVQVAE(in_channels=1, widths=[8], latent_channels=4, vocab_size=16,
                            patch_nums=[4], phi_share=1).eval()
    make_phi_identity(model)
    chosen = torch.randperm(16)[:16].view(1, 4, 4)
    f = model.quantizer.embedding(chosen).permute(0, 3, 1, 2).contiguous().detach()
    q = model.quantizer(f)
    assert torch.equal(q.indices[0], chosen)
    torch.testing.assert_close(q.f_hats[0], f, atol=1e-6, rtol=0)


def test_decode_of_encode_is_the_model_reconstruction():
    model = tiny_model().eval()
    x = to_float(tiny_images(6))
    with torch.no_grad():
        recon = model(x).recon.clamp(-1, 1)
        decoded = model.decode(model.encode(x))
        assert torch.equal(decoded, recon)
        assert torch.equal(model.partial_decode(model.encode(x), 3), recon)
        coarse = model.partial_decode(model.encode(x), 1)
    assert not torch.equal(coarse, recon)


def _grad_size(param: torch.nn.Parameter) -> float:
    return 0.0 if param.grad is None else param.grad.abs().sum().item()


def test_training_forward_is_straight_through():
    model = tiny_model().train()
    encoder, codebook = model.encoder.layers[0].weight, model.quantizer.embedding.weight
    x = to_float(tiny_images(4))
    model(x, partial_k=1).recon.square().mean().backward()
    assert _grad_size(encoder) > 0  # decoder gradients reach the encoder ...
    assert _grad_size(codebook) == 0  # ... but not the codebook
    model.zero_grad(set_to_none=True)
    model(x, partial_k=1).partial.square().mean().backward()
    assert _grad_size(encoder) == 0  # the partial decode never reaches the encoder
    assert _grad_size(codebook) > 0
    assert _grad_size(model.quantizer.phis[0].conv.weight) > 0


def test_var_input_matches_step_by_step_autoregressive_input():
    model = tiny_model().eval()
    with torch.no_grad():
        indices = model.encode(to_float(tiny_images(3)))
        teacher = model.indices_to_var_input(indices)
        assert teacher.shape == (3, 4 + 16, 4)
        f_hat = model.empty_fhat(3)
        assert f_hat.shape == (3, 4, 4, 4) and not f_hat.any()
        steps = []
        for k, idx in enumerate(indices):
            f_hat, nxt = model.next_var_input(k, f_hat, idx)
            if nxt is not None:
                steps.append(nxt)
        assert nxt is None
        torch.testing.assert_close(torch.cat(steps, 1), teacher, atol=0, rtol=0)
        torch.testing.assert_close(model.fhat_to_image(f_hat), model.decode(indices))
        # the last input is f_hat after two scales at full latent size, row-major
        expected = model.indices_to_fhat(indices[:2]).flatten(2).transpose(1, 2)
        torch.testing.assert_close(teacher[:, 4:], expected)


def test_load_helpers_round_trip(tmp_path):
    model = tiny_model().eval()
    clusters = torch.arange(16) % 4
    path = tmp_path / "tokenizer.pt"
    save_torch({"config": model.config, "state_dict": model.state_dict(),
                "code_to_cluster": clusters, "num_clusters": 4}, path)
    loaded = load_tokenizer(path)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.patch_nums == (1, 2, 4) and loaded.vocab_size == 16
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    code_to_cluster, num = load_code_clusters(path)
    assert torch.equal(code_to_cluster, clusters) and num == 4


def _train(tmp_path, name: str, seed: int = 0, stop_at: int | None = None,
           tp: TokenizerParams = TINY) -> tuple[MultiScaleVQVAE, object]:
    setup(seed, 1)
    model = tiny_model()
    state = train_tokenizer(model, tiny_images(), tp, seed=0, checkpoint=tmp_path / name,
                            fingerprint={"tp": tp.model_dump()}, stop_at=stop_at)
    return model, state


def _same_weights(a: MultiScaleVQVAE, b: MultiScaleVQVAE) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_same_seed_gives_identical_weights_and_reseeding_runs(tmp_path):
    a, state_a = _train(tmp_path, "a.pt")
    b, _ = _train(tmp_path, "b.pt")
    assert _same_weights(a, b)
    assert state_a.step == 6 and len(state_a.curves) == 6
    assert state_a.reseeded > 0  # threshold 1.5 x uniform: some codes are always "dead"
    c, _ = _train(tmp_path, "c.pt", seed=1)
    assert not _same_weights(a, c)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    full, full_state = _train(tmp_path, "full.pt")
    _, first = _train(tmp_path, "split.pt", stop_at=3)
    assert first.step == 3 and load_torch(tmp_path / "split.pt")["step"] == 3
    resumed, resumed_state = _train(tmp_path, "split.pt", seed=7)  # other init: weights must come
    assert _same_weights(full, resumed)                            # from the checkpoint
    assert resumed_state.curves == full_state.curves


def test_changed_params_do_not_resume(tmp_path):
    _train(tmp_path, "ck.pt", stop_at=3)
    other = TINY.model_copy(update={"lr": 1e-3})
    _, state = _train(tmp_path, "ck.pt", tp=other)
    assert state.curves[0]["step"] == 0 and len(state.curves) == 6


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    bad = TINY.model_copy(update={"lr": 1e30, "warmup_steps": 0, "save_every": 1,
                                  "reseed_every": 0})
    with pytest.raises(StageError, match="last good checkpoint"):
        _train(tmp_path, "nan.pt", tp=bad)
    saved = load_torch(tmp_path / "nan.pt")
    assert saved["step"] >= 1
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in saved["curves"])


def test_reseed_moves_only_dead_codes_onto_residuals():
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    before = model.quantizer.embedding.weight.detach().clone()
    usage = torch.ones(16)
    usage[[3, 9]] = 0.01
    residuals = torch.randn(50, 4) + 10.0  # far from every initial code
    assert reseed_dead_codes(model, usage, residuals, 0.03, optimizer) == 2
    after = model.quantizer.embedding.weight.detach()
    moved = [i for i in range(16) if not torch.equal(after[i], before[i])]
    assert moved == [3, 9]
    assert all((residuals == after[i]).all(1).any() for i in moved)
    assert torch.equal(usage, torch.ones(16))


def test_psnr_and_metrics():
    assert psnr(torch.tensor([0.01, 0.0001])).tolist() == pytest.approx([20.0, 40.0])
    model = tiny_model().eval()
    images = tiny_images(10)
    metrics = evaluate_tokenizer(model, images, batch_size=4)
    assert metrics["psnr_k"]["3"] == metrics["psnr"]
    # mean of per-image PSNRs >= PSNR of the mean MSE (Jensen), equal only if all MSEs agree
    assert metrics["psnr"] >= 10 * math.log10(1 / metrics["mse"])
    assert 0 < metrics["usage"] <= 1 and 1 <= metrics["perplexity"] <= 16
    black = ((images.double() / 255) ** 2).flatten(1).mean(1)
    assert metrics["psnr_black"] == pytest.approx((10 * torch.log10(1 / black)).mean().item())
    with torch.no_grad():
        x = to_float(images)
        one = model.partial_decode(model.encode(x), 1)
    mse_1 = ((one.double() - x.double()) / 2).square().flatten(1).mean(1)
    expected = (10 * torch.log10(1 / mse_1)).mean().item()
    assert metrics["psnr_k"]["1"] == pytest.approx(expected, abs=1e-4)


def test_cluster_codebook_groups_identical_codes():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    codebook = centres.repeat_interleave(4, dim=0) + 0.01 * torch.randn(16, 2)
    labels = cluster_codebook(codebook, 4, seed=0)
    assert labels.dtype == torch.int64 and labels.shape == (16,)
    groups = labels.view(4, 4)
    assert all(len(set(row.tolist())) == 1 for row in groups)
    assert len(set(groups[:, 0].tolist())) == 4
    assert torch.equal(labels, cluster_codebook(codebook, 4, seed=0))


def _stage_params() -> Params:
    return params_from_yaml(data={"source": "mnist5k", "image_size": 8}, tokenizer=TINY, threads=1,
                            seed=0)


def test_stages_train_tokenize_and_decode(tmp_path, monkeypatch):
    import stages.tokenize
    import stages.tokenizer

    monkeypatch.chdir(tmp_path)
    params = _stage_params()
    with pytest.raises(StageError, match="prepare"):
        stages.tokenizer.run(params)
    images = {"train": tiny_images(24, 1), "val": tiny_images(6, 2), "test": tiny_images(5, 3)}
    save_prepared(tmp_path / "data/prepared",
                  {split: (imgs, torch.arange(len(imgs)) % 2) for split, imgs in images.items()},
                  ["a", "b"])
    setup(0, 1)
    stages.tokenizer.run(params)
    for out in ["models/tokenizer.pt", "models/tokenizer.params.json", "metrics/tokenizer.json",
                "plots/tokenizer/curves.tsv", "plots/tokenizer/grid.png"]:
        assert (tmp_path / out).is_file(), out
    assert not (tmp_path / "checkpoints/tokenizer.pt").exists()  # removed once done
    code_to_cluster, num = load_code_clusters("models/tokenizer.pt")
    assert num == 4 and code_to_cluster.shape == (16,) and code_to_cluster.max() < 4
    assert len((tmp_path / "plots/tokenizer/curves.tsv").read_text().splitlines()) == 1 + 6

    stages.tokenize.run(params)
    model = load_tokenizer("models/tokenizer.pt")
    for split, imgs in images.items():
        saved = load_token_arrays(tmp_path / "data/tokens", split)
        assert saved.indices.dtype == torch.uint8 and saved.indices.shape == (len(imgs), 21)
        assert saved.patch_nums == [1, 2, 4] and saved.classes == ["a", "b"]
        assert torch.equal(saved.labels, torch.arange(len(imgs)) % 2)
        with torch.no_grad():
            decoded = model.decode(split_indices(saved.indices, saved.patch_nums))
            recon = model(to_float(imgs)).recon.clamp(-1, 1)
        torch.testing.assert_close(decoded, recon, atol=1e-5, rtol=0)


def test_stage_takes_a_given_tokenizer_instead_of_training(tmp_path, monkeypatch):
    """tokenizer.init_from (an imported VAR VQ-VAE, say): the stage keeps its weights
    and code clusters, trains nothing, and refuses one whose sizes differ."""
    import stages.tokenizer

    monkeypatch.chdir(tmp_path)
    save_prepared(tmp_path / "data/prepared", {split: (tiny_images(n, 1), torch.arange(n) % 2)
                                                for split, n in (("train", 8), ("val", 4))},
                  ["a", "b"])
    torch.manual_seed(5)
    given = build_tokenizer(TINY, 1)
    clusters = torch.arange(16) % 4
    save_torch({"config": given.config, "state_dict": given.state_dict(),
                "code_to_cluster": clusters, "num_clusters": 4}, tmp_path / "given.pt")
    params = params_from_yaml(data={"source": "mnist5k", "image_size": 8}, threads=1, seed=0,
                              tokenizer=TINY.model_copy(update={"init_from": str(tmp_path / "given.pt")}))
    setup(0, 1)
    stages.tokenizer.run(params)
    saved = load_torch(tmp_path / "models/tokenizer.pt")
    for name, value in given.state_dict().items():
        assert torch.equal(saved["state_dict"][name], value), name
    assert torch.equal(saved["code_to_cluster"], clusters)
    metrics = json.loads((tmp_path / "metrics/tokenizer.json").read_text())
    assert metrics["init_from"] == str(tmp_path / "given.pt") and "train_steps" not in metrics
    wider = params.model_copy(update={"tokenizer": params.tokenizer.model_copy(
        update={"vocab_size": 32, "semantic_clusters": 4})})
    with pytest.raises(StageError, match="vocab_size: file 16 vs params 32"):
        stages.tokenizer.run(wider)
