"""The training loop: optimizer groups, token weighting, label dropout, resume,
NaN guard, the `up` variant's temperatures, and the train stage's outputs."""

import json
import math

import pytest
import torch

from tests.project import (
    CLASSES,
    PATCH_NUMS,
    V,
    crafted_checkpoint,
    make_project,
    params_dict,
    params_from_yaml,
    run_paths,
    tiny_params,
    train_tiny,
)
from up.core.distributed import Dist
from up.core.errors import StageError
from up.core.io import load_torch
from up.core.runtime import setup
from up.data.tokens import TeacherForcing, load_token_split, training_ids
from up.models.tokenizer import MultiScaleVQVAE, load_tokenizer
from up.models.transformer import VAR
from up.training.run import (
    build_run,
    drop_labels,
    finish,
    param_groups,
    token_weights,
    train,
    training_compute,
)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: params come from the test alone
    return make_project(tmp_path)


class Interrupted(Exception):
    pass


def failing_loss(monkeypatch, at_call: int, action: str):
    """Make the loss raise (``interrupt``) or return NaN (``nan``) at its ``at_call``-th call."""
    import up.training.run

    build = up.training.run.build_loss

    def patched(*args, **kwargs):
        loss = build(*args, **kwargs)
        forward, calls = loss.forward, [0]

        def forward_once(logits, targets, **kwargs):
            calls[0] += 1
            total, parts = forward(logits, targets, **kwargs)
            if calls[0] == at_call:
                if action == "interrupt":
                    raise Interrupted
                parts = {**parts, "ce": parts["ce"] * math.nan}
                total = total * math.nan
            return total, parts

        loss.forward = forward_once
        return loss

    monkeypatch.setattr(up.training.run, "build_loss", patched)


def test_weight_decay_only_on_linear_matrices():
    model = VAR(V, 4, PATCH_NUMS, CLASSES, depth=1, width=16, heads=2)
    decay, rest = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == sorted([
        "word_embed.weight", "blocks.0.ada_lin.1.weight", "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight",
        "head.ada_lin.1.weight", "head.out.weight"])
    assert decay["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
    no_decay = {names[id(p)] for p in rest["params"]}
    assert {"pos_embed", "pos_start", "class_emb.weight", "scale_embed.weight",
            "blocks.0.attn.log_scale", "blocks.0.attn.q_bias", "head.out.bias"} <= no_decay
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))
    # With zero gradients AdamW moves only the decayed tensors: p <- p (1 - lr wd).
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([decay, rest], lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        factor = 1 - 0.1 * 0.05 if n in {names[id(q)] for q in decay["params"]} else 1.0
        assert torch.allclose(p, before[n] * factor), n


def test_token_weights():
    scale_ids = torch.tensor([0] + [1] * 4 + [2] * 16)
    uniform = token_weights(scale_ids, "uniform")
    assert torch.allclose(uniform, torch.full((21,), 1 / 21))
    per_scale = token_weights(scale_ids, "per_scale")
    assert per_scale[0] == pytest.approx(1 / 3)
    assert torch.allclose(per_scale[1:5], torch.full((4,), 1 / 12))
    assert torch.allclose(per_scale[5:], torch.full((16,), 1 / 48))
    assert per_scale.sum() == pytest.approx(1.0)


def test_label_dropout_is_sharded_and_seeded():
    labels = torch.arange(2000) % 7
    full = drop_labels(labels, 0.25, 7, seed=3, step=11)
    shards = [drop_labels(labels[r * 1000:(r + 1) * 1000], 0.25, 7, 3, 11, rank=r, world=2)
              for r in range(2)]
    assert torch.equal(torch.cat(shards), full)
    dropped = full == 7
    assert 0.2 < dropped.float().mean() < 0.3
    assert torch.equal(full[~dropped], labels[~dropped])
    assert not torch.equal(drop_labels(labels, 0.25, 7, 3, 12), full)
    assert torch.equal(drop_labels(labels, 0.0, 7, 3, 11), labels)


def test_teacher_forcing_cache_equals_per_batch(project):
    tok = MultiScaleVQVAE(in_channels=1, widths=[8], res_blocks=0, latent_channels=4,
                          vocab_size=V, patch_nums=PATCH_NUMS, phi_share=2).eval()
    indices = torch.randint(0, V, (10, 21))
    cached = TeacherForcing(tok, indices, torch.device("cpu"))
    direct = TeacherForcing(tok, indices, torch.device("cpu"), cache_bytes=0)
    assert cached.cache is not None and direct.cache is None
    ids = torch.tensor([7, 2, 2, 9])
    assert cached(ids).shape == (4, 20, 4)
    assert torch.allclose(cached(ids), direct(ids), atol=1e-6)


@pytest.mark.parametrize("variant", ["ce", "up"])
def test_resume_equals_uninterrupted(project, monkeypatch, variant):
    # drop-path and EMA make the RNG state and the EMA weights part of what must resume.
    params = tiny_params(train={"steps": 8, "ema": 0.9, "cond_drop": 0.3},
                         transformer={"drop_path": 0.2})
    whole = train_tiny(project, params, variant, "whole.pt")

    failing_loss(monkeypatch, at_call=5, action="interrupt")  # dies in step 5
    with pytest.raises(Interrupted):
        train_tiny(project, params, variant, "parts.pt")
    assert load_torch(project / "parts.pt")["step"] == 4
    monkeypatch.undo()
    monkeypatch.chdir(project)
    resumed = train_tiny(project, params, variant, "parts.pt")

    for key in ("state_dict", "ema_state_dict"):
        for name, value in whole.model[key].items():
            assert torch.equal(value, resumed.model[key][name]), (key, name)
    assert resumed.rows == whole.rows
    assert [r["step"] for r in whole.rows] == [2, 4, 6, 8]
    if variant == "up":
        assert torch.equal(whole.model["temperatures"], resumed.model["temperatures"])


def test_checkpoint_of_other_settings_is_ignored(project, capsys):
    train_tiny(project, tiny_params(train={"steps": 2}), "ce", "ckpt.pt")
    fresh = train_tiny(project, tiny_params(train={"steps": 2, "lr": 1e-3}), "ce", "ckpt.pt")
    assert "ignoring" in capsys.readouterr().out
    assert fresh.model["step"] == 2


def test_nan_guard_stops_and_keeps_last_good_checkpoint(project, monkeypatch):
    failing_loss(monkeypatch, at_call=5, action="nan")
    with pytest.raises(StageError) as err:
        train_tiny(project, tiny_params(), "ce", "ckpt.pt")
    message = str(err.value)
    assert "non-finite loss and ce at step 5" in message
    assert "ckpt.pt (after step 4) is kept" in message
    state = load_torch(project / "ckpt.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_up_variant_trains_with_finite_parts_and_temperatures(project):
    result = train_tiny(project, tiny_params(train={"steps": 6}), "up")
    rows = result.rows
    assert {"loss", "ce", "disp", "se", "grad_norm", "val_ce", "T_1x1", "T_2x2", "T_4x4"} \
        <= set(rows[0])
    assert all(math.isfinite(v) for row in rows for v in row.values())
    assert [r["T_4x4"] for r in rows][0] == 1.0  # step 2: before the first refit (step 3)
    temps = result.model["temperatures"]
    assert temps.shape == (3,) and not torch.equal(temps, torch.ones(3))
    assert [r["T_4x4"] for r in rows][-1] == pytest.approx(float(temps[2]), rel=1e-5)
    assert result.metrics["temperatures"]["4x4"] == pytest.approx(float(temps[2]))
    assert set(result.metrics["final_loss"]) >= {"loss", "ce", "disp", "se"}
    # total = ce + lambda_disp * disp + lambda_se * se (defaults 0.5, 0.1), per step then averaged
    last = rows[-1]
    assert last["loss"] == pytest.approx(last["ce"] + 0.5 * last["disp"] + 0.1 * last["se"],
                                         rel=1e-4)
    # each term's dose: its weight times the logged part, per row and at the end
    for row in rows:
        assert row["dose_disp"] == pytest.approx(0.5 * row["disp"], rel=1e-5)
        assert row["dose_se"] == pytest.approx(0.1 * row["se"], rel=1e-5)
        assert "dose_kd" not in row
    assert result.metrics["dose"] == {"ce": last["ce"], "disp": last["dose_disp"],
                                      "se": last["dose_se"]}
    assert set(result.metrics["final_loss"]) == {"loss", "ce", "disp", "se"}


def test_compiled_training_follows_the_eager_run_and_repeats_bitwise(project):
    """train.compile (params.yaml's default) changes how the blocks run, not what the model
    learns: from one seed the compiled run's losses and weights stay within floating-point
    noise of the eager run's (not bitwise: inductor fuses and reorders the arithmetic),
    and a second compiled run repeats the first bitwise. Two threads: with one, inductor's
    C++ code has no cross-thread atomics, which made a whole compiled model's runs
    differ (the embeddings' backward); only the blocks are compiled."""
    # big enough a batch for the threads to race on the embeddings' rows
    settings, wider = {"steps": 6, "batch_size": 32, "cond_drop": 0.3}, {"width": 64}
    eager = train_tiny(project, tiny_params(train=settings, transformer=wider), "up", "eager.pt",
                       threads=2)
    compiled, again = (train_tiny(project, tiny_params(train={**settings, "compile": True},
                                                       transformer=wider), "up", name, threads=2)
                       for name in ("compiled.pt", "again.pt"))
    assert [r["step"] for r in compiled.rows] == [r["step"] for r in eager.rows] == [2, 4, 6]
    for ours, theirs in zip(compiled.rows, eager.rows, strict=True):
        for key in ("loss", "ce", "disp", "se", "val_ce"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (ours["step"], key)
    for name, value in eager.model["state_dict"].items():
        assert torch.allclose(compiled.model["state_dict"][name], value, atol=1e-4), name
        assert torch.equal(again.model["state_dict"][name], compiled.model["state_dict"][name]), name
    assert again.rows == compiled.rows


def test_compile_without_a_cpp_compiler_names_the_param(project, monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    def no_compiler():
        raise InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(StageError, match=r"train.compile: true .* no C\+\+ compiler .* set "
                                         r"train.compile false"):
        train_tiny(project, tiny_params(train={"compile": True}), "ce")


def test_stage_writes_outputs_and_learns(project):
    import yaml

    from stages.train import run as run_stage
    from up.models.transformer import load_var

    params = tiny_params(train={"steps": 30, "lr": 1e-2, "log_every": 10, "save_every": 10,
                                "cond_drop": 0.0})
    (project / "params.yaml").write_text(yaml.safe_dump(params_dict(**params)))
    setup(0, 1)
    run_stage(params_from_yaml(**params), "ls", 0)
    assert not (project / "checkpoints" / "var-ls-s0.pt").exists()  # removed once done
    saved = load_torch(project / "models" / "var-ls-s0.pt")
    assert saved["step"] == 30 and saved["temperatures"] is None
    assert saved["variant"] == {"name": "ls", "loss": "ls", "epsilon": 0.1}
    model = load_var(project / "models" / "var-ls-s0.pt")
    assert model.num_parameters() == json.loads(
        (project / "metrics" / "train-ls-s0.json").read_text())["parameters"]
    metrics = json.loads((project / "metrics" / "train-ls-s0.json").read_text())
    assert set(metrics["val"]["ce_per_scale"]) == {"1x1", "2x2", "4x4"}
    assert metrics["val"]["ce"] < math.log(V) - 0.3  # learned the class -> token structure
    assert "ece" not in metrics["val"]  # calibration is the evaluate stage's, computed once
    assert metrics["speed"]["tokens_per_s"] > 0 and metrics["train"]["images"] == 12
    assert metrics["train_images"] == 32  # 40 minus the calibration slice of 20 %
    tsv = (project / "plots" / "train" / "ls-s0.tsv").read_text().splitlines()
    assert tsv[0].split("\t")[:3] == ["step", "lr", "loss"] and len(tsv) == 4
    assert not any(c.startswith("dose_") for c in tsv[0].split("\t"))  # ls adds no term
    assert metrics["dose"] == {"ce": float(tsv[-1].split("\t")[3])}
    # the calibration slice's NLL: every token of its 8 images, the model's own probabilities
    _, calib_ids = training_ids(torch.arange(40) % 3, 0.2, 0, seed=0, train_seed=0)
    split = load_token_split(project / "data" / "tokens", "train",
                             load_tokenizer(project / "models" / "tokenizer.pt"), torch.device("cpu"))
    labels, inputs, targets = split.batch(calib_ids, torch.device("cpu"))
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(labels, inputs).flatten(0, 1), targets.flatten())
    assert metrics["calib"] == {"nll": pytest.approx(float(nll), rel=1e-5), "tokens": 8 * 21}
    # training compute: 3 forwards' worth per image per step, no teacher
    flops = 3 * model.forward_flops() * 30 * 8 / 1e9
    assert metrics["compute"] == {"student_gflop": pytest.approx(flops), "teacher_gflop": 0.0,
                                  "total_gflop": pytest.approx(flops)}
    val_ce = [float(line.split("\t")[-1]) for line in tsv[1:]]
    assert val_ce[-1] < val_ce[0]
    resolved = json.loads((project / "models" / "var-ls-s0.params.json").read_text())
    assert resolved["train"]["steps"] == 30 and resolved["variant"] == "ls"


def _training_ids_before_seeds(labels, calib_fraction, images_per_class, seed):
    """training_ids as it was before training seeds drew the subset (the first n of each
    class in the pipeline seed's order): the default run's images must not change."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held = round(calib_fraction * len(labels))
    calib, fit = perm[:held], perm[held:]
    if images_per_class > 0:
        fit_labels = labels[fit]
        rank = torch.zeros_like(fit)
        for c in fit_labels.unique():
            mask = fit_labels == c
            rank[mask] = torch.arange(int(mask.sum()))
        fit = fit[rank < images_per_class]
    return fit.sort().values, calib.sort().values


def test_forward_flops_by_hand_and_against_the_flop_counter():
    """V 16, C 4, scales 1 and 2 (L 5), one block of width 8, MLP 32: per image
    word_embed 2*4*4*8 = 256; block: ada 2*8*48 = 768, qkv 2*5*8*24 = 1920, attention
    4*5*5*8 = 800, proj 2*5*8*8 = 640, MLP 4*5*8*32 = 5120; head: ada 2*8*16 = 256,
    out 2*5*8*16 = 1280."""
    from torch.utils.flop_counter import FlopCounterMode

    model = VAR(16, 4, [1, 2], 3, depth=1, width=8, heads=2)
    assert model.forward_flops() == 256 + 768 + 1920 + 800 + 640 + 5120 + 256 + 1280
    # torch's counter agrees on the matrix products (on CPU it does not see the
    # masked attention, the 4 L^2 W per block added here)
    model = VAR(V, 4, PATCH_NUMS, CLASSES, depth=2, width=32, heads=2)
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(3, dtype=torch.long), torch.randn(3, model.seq_len - 1, 4))
    attention = 2 * 4 * model.seq_len ** 2 * 32
    assert model.forward_flops() == counter.get_total_flops() / 3 + attention
    teacher = VAR(V, 4, PATCH_NUMS, CLASSES, depth=1, width=32, heads=2)
    cost = training_compute(model, steps=10, batch_size=4, teacher=teacher)
    assert cost["student_gflop"] == pytest.approx(3 * model.forward_flops() * 40 / 1e9)
    assert cost["teacher_gflop"] == pytest.approx(teacher.forward_flops() * 40 / 1e9)
    assert cost["total_gflop"] == pytest.approx(cost["student_gflop"] + cost["teacher_gflop"])


def test_calibration_slice_is_disjoint_seeded_and_shared(project):
    labels = torch.arange(100) % 5
    fit, calib = training_ids(labels, 0.2, 0, seed=0, train_seed=0)
    assert len(calib) == 20 and len(fit) == 80
    assert not set(fit.tolist()) & set(calib.tolist())
    old_fit, old_calib = _training_ids_before_seeds(labels, 0.2, 0, seed=0)
    assert torch.equal(fit, old_fit) and torch.equal(calib, old_calib)
    for train_seed in (1, 7):  # all images: the training seed plays no part
        again = training_ids(labels, 0.2, 0, seed=0, train_seed=train_seed)
        assert torch.equal(again[0], fit) and torch.equal(again[1], calib)
    # images_per_class > 0: the training seed draws the subset, never from the slice
    subsets = {}
    for train_seed in range(4):
        small, calib_small = training_ids(labels, 0.2, 3, seed=0, train_seed=train_seed)
        assert torch.equal(calib_small, calib)  # fixed by the pipeline seed alone
        assert torch.bincount(labels[small]).tolist() == [3] * 5
        assert not set(small.tolist()) & set(calib.tolist())
        subsets[train_seed] = small
        assert torch.equal(training_ids(labels, 0.2, 3, seed=0, train_seed=train_seed)[0], small)
    assert len({tuple(x.tolist()) for x in subsets.values()}) == 4  # every seed its own
    # every variant trains on the same images; training seeds too when all are used
    params = params_from_yaml(**tiny_params())
    ids = {(v, s): build_run(params, v, s, run_paths(project)).fit_ids
           for v in ("ce", "ls", "up") for s in (0, 1)}
    first = ids[("ce", 0)]
    assert all(torch.equal(first, other) for other in ids.values())
    assert len(first) == 32
    small = params_from_yaml(**tiny_params(train={"images_per_class": 4}))
    ids = {(v, s): build_run(small, v, s, run_paths(project)).fit_ids
           for v in ("ce", "up") for s in (0, 1)}
    assert torch.equal(ids[("ce", 0)], ids[("up", 0)]) and torch.equal(ids[("ce", 1)], ids[("up", 1)])
    assert not torch.equal(ids[("ce", 0)], ids[("ce", 1)]) and len(ids[("ce", 0)]) == 12


def test_teacher_reference_is_frozen_and_changes_the_gradient(project):
    import stages.train

    params = tiny_params(train={"steps": 4})
    (project / "models").mkdir(exist_ok=True)
    setup(0, 1)
    stages.train.run(params_from_yaml(**params), "ce", 0)  # writes models/var-ce-s0.pt
    teacher_file = project / "models" / "var-ce-s0.pt"
    before = {k: v.clone() for k, v in load_torch(teacher_file)["state_dict"].items()}

    state = build_run(params_from_yaml(**params), "up_teacher", 0,
                      run_paths(project, teacher=teacher_file))
    teacher = state.reference.model
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not torch.equal(state.reference.temperatures, torch.ones(3))  # fitted once
    train(state, project / "ckpt.pt")
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert state.log.rows[-1]["disp"] > 0  # the teacher differs from the student
    compute = finish(state, params_from_yaml(**params)).metrics["compute"]  # pays the teacher
    assert compute["teacher_gflop"] == pytest.approx(teacher.forward_flops() * 4 * 8 / 1e9)
    assert compute["total_gflop"] == pytest.approx(4 * teacher.forward_flops() * 4 * 8 / 1e9)

    # kd distils the same frozen, tempered teacher; its dose is lambda_kd x KL
    params["derived"]["kd"] = {"loss": "kd", "lambda_kd": 3.0}
    kd = build_run(params_from_yaml(**params), "kd", 0, run_paths(project, "kd.pt", teacher_file))
    assert isinstance(kd.reference, type(state.reference))
    assert torch.equal(kd.reference.temperatures, state.reference.temperatures)
    train(kd, project / "kd.pt")
    rows = kd.log.rows
    assert all(r["dose_kd"] == pytest.approx(3.0 * r["kd"], rel=1e-5) and r["kd"] > 0 for r in rows)
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["ce"] + rows[-1]["dose_kd"], rel=1e-4)
    metrics = finish(kd, params_from_yaml(**params)).metrics
    assert metrics["dose"] == {"ce": rows[-1]["ce"], "kd": rows[-1]["dose_kd"]}

    # The same batch and weights: the up gradient is not the CE gradient.
    labels, inputs, targets = state.data.batch(state.fit_ids[:8], state.device)
    logits = state.model(labels, inputs)
    ref = state.reference(labels, inputs, targets)
    up_total, _ = state.loss_fn(logits, targets, reference=ref)
    g_up = torch.autograd.grad(up_total.mean(), logits, retain_graph=True)[0]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    g_ce = torch.autograd.grad(ce, logits)[0]
    assert not torch.allclose(g_up, g_ce, atol=1e-6)


def test_ts_variant_scales_the_teacher(project):
    import stages.train

    params = tiny_params(train={"steps": 4})
    setup(0, 1)
    stages.train.run(params_from_yaml(**params), "ce", 0)
    stages.train.run(params_from_yaml(**params), "ce+ts", 0)
    teacher = load_torch(project / "models" / "var-ce-s0.pt")
    scaled = load_torch(project / "models" / "var-ce+ts-s0.pt")
    for name, value in teacher["state_dict"].items():
        assert torch.equal(value, scaled["state_dict"][name]), name
    temps = scaled["logit_temperatures"]
    assert temps.shape == (3,) and (temps > 0).all() and not torch.equal(temps, torch.ones(3))
    m_ce = json.loads((project / "metrics" / "train-ce-s0.json").read_text())
    m_ts = json.loads((project / "metrics" / "train-ce+ts-s0.json").read_text())
    # temperature scaling keeps every argmax, so the token accuracy is unchanged
    assert m_ts["val"]["accuracy"] == pytest.approx(m_ce["val"]["accuracy"])
    assert m_ts["val"]["ce"] != pytest.approx(m_ce["val"]["ce"])


def test_init_from_starts_from_given_weights_and_checks_shapes(project):
    import stages.train

    setup(0, 1)
    stages.train.run(params_from_yaml(**tiny_params(train={"steps": 2})), "ce", 0)
    given = load_torch(project / "models" / "var-ce-s0.pt")["state_dict"]
    given_file = str(project / "models" / "var-ce-s0.pt")
    params = params_from_yaml(**tiny_params(train={"init_from": given_file}))
    state = build_run(params, "ls", 0, run_paths(project, "ft.pt"))
    for name, value in state.model.state_dict().items():
        assert torch.equal(value, given[name]), name
    wider = params_from_yaml(**tiny_params(train={"init_from": given_file},
                                           transformer={"width": 64}))
    with pytest.raises(StageError, match="width: file 32 vs params 64"):
        build_run(wider, "ls", 0, run_paths(project, "ft2.pt"))


def test_crafted_init_from_is_refused_and_its_payload_never_runs(project):
    marker = project / "payload-ran"
    evil = crafted_checkpoint(project / "evil.pt", marker)
    params = params_from_yaml(**tiny_params(train={"init_from": str(evil)}))
    with pytest.raises(StageError, match="refused") as err:
        build_run(params, "ce", 0, run_paths(project, "ft.pt"))
    assert str(evil) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists(), "the checkpoint's payload ran"


def test_token_sample_respects_the_size_per_scale():
    from up.models.temperature import token_sample

    ids = torch.arange(100, 110)
    sample = token_sample(ids, [1, 2, 4], per_scale=12, seed=3)
    starts = [0, 1, 5, 21]
    taken = [int(sample.mask[:, a:b].sum()) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    assert taken == [10, 12, 12]  # 10 tokens of the 1x1 scale exist: all of them
    assert set(sample.ids.tolist()) <= set(ids.tolist()) and bool(sample.mask.any(1).all())
    again = token_sample(ids, [1, 2, 4], per_scale=12, seed=3)
    assert torch.equal(again.mask, sample.mask) and torch.equal(again.ids, sample.ids)
    assert not torch.equal(token_sample(ids, [1, 2, 4], 12, seed=4).mask, sample.mask)
    everything = token_sample(ids, [1, 2, 4], per_scale=0, seed=3)
    assert torch.equal(everything.ids, ids) and bool(everything.mask.all())
    halves = [everything.shard(Dist(rank, 2)) for rank in (0, 1)]
    assert torch.equal(torch.cat([h.ids for h in halves]), ids)


def test_empirical_reference_is_counted_per_training_seed(project):
    """reference@seed counts the images that seed trains on (images_per_class > 0: its
    own draw) into models/reference-s<seed>.pt, and the seed's run trains against it;
    another seed's table is refused."""
    import stages.reference
    import stages.train

    params = tiny_params(train={"steps": 2, "images_per_class": 4})
    params["variants"]["up_emp"] = {"loss": "up", "reference": "empirical", "lambda_disp": 2.0}
    setup(0, 1)
    for seed in (0, 1):
        stages.reference.run(params_from_yaml(**params), seed)
    tables = [load_torch(project / "models" / f"reference-s{seed}.pt") for seed in (0, 1)]
    assert [len(t["fit_ids"]) for t in tables] == [12, 12]
    assert not torch.equal(tables[0]["fit_ids"], tables[1]["fit_ids"])
    assert (project / "metrics" / "reference-s1.json").is_file()
    stages.train.run(params_from_yaml(**params), "up_emp", 1)
    rows = (project / "plots" / "train" / "up_emp-s1.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    disp = [float(r.split("\t")[header.index("disp")]) for r in rows[1:]]
    dose = [float(r.split("\t")[header.index("dose_disp")]) for r in rows[1:]]
    assert all(d > 0 for d in disp) and dose == pytest.approx([2.0 * d for d in disp], rel=1e-5)
    paths = run_paths(project, "emp.pt")
    paths.reference = project / "models" / "reference-s0.pt"
    with pytest.raises(StageError, match="other training images"):
        build_run(params_from_yaml(**params), "up_emp", 1, paths)
