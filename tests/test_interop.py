"""VAR's released checkpoints load into our models and compute what VAR computes.

Every reference here comes from VAR's own code (FoundationVision/VAR at
commit 78b9539, tests/fixtures/var-official/README.md): seeded random weights
at a small size, and the key/shape manifests of the released full-size files.
None of it is our own output, so passing means our tokenizer and transformer
are interchangeable with VAR's, not merely self-consistent.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from stages.cli import app
from stages.interop import export_checkpoints, import_checkpoints, parse_class_rows
from up.core.errors import StageError
from up.core.io import save_torch
from up.generation.sampler import sample
from up.models.interop import (
    build_vae,
    build_var,
    export_vae,
    export_var,
    import_vae,
    import_var,
    infer_vae_config,
    infer_var_config,
    select_class_rows,
    shapes_of,
)
from up.models.tokenizer import (
    MultiScaleVQVAE,
    load_code_clusters,
    load_tokenizer,
    phi_assignment,
    to_float,
)
from up.models.transformer import load_var

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "var-official"


def _load(name: str):
    return torch.load(FIXTURE / name, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def ref() -> dict:
    return _load("reference.pt")


@pytest.fixture(scope="module")
def var_state() -> dict:
    return _load("var.pth")


@pytest.fixture(scope="module")
def vae_state() -> dict:
    return _load("vae.pth")


@pytest.fixture(scope="module")
def models(var_state, vae_state):
    """Imported once per module: the VQ-VAE at 256 px is the slow part."""
    torch.set_num_threads(1)
    var = import_var(var_state)
    return var, import_vae(vae_state, var.patch_nums)


def _grids(flat: list[torch.Tensor], patch_nums) -> list[torch.Tensor]:
    """VAR's (B, p^2) row-major index lists -> our (B, p, p) maps."""
    return [idx.view(-1, p, p) for idx, p in zip(flat, patch_nums, strict=True)]


# -- phi rule ---------------------------------------------------------------------

def test_var_phi_rule_matches_vars_code():
    """VAR special-cases 4 shared phi convs (ticks at 1/(3K) ... 1-1/(3K)); its
    released VQ-VAE only reproduces with that assignment."""
    config = json.loads((FIXTURE / "config.json").read_text())
    assert phi_assignment(10, 4, "var") == config["phi_of_scale"] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_assignment(10, 4, "legacy") == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
    for scales, share in [(6, 6), (10, 5), (10, 3), (6, 1), (10, 10)]:  # 1/(2K) for other counts
        assert phi_assignment(scales, share, "var") == phi_assignment(scales, share, "legacy")


def test_old_tokenizer_checkpoints_keep_the_legacy_rule(tmp_path):
    """A checkpoint saved before `phi_rule` existed has no such key: it must
    reload with the rule it was trained with and give the same indices;
    a new tokenizer records VAR's rule."""
    kwargs = dict(in_channels=1, widths=[8], res_blocks=0, latent_channels=4, vocab_size=16,
                  patch_nums=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16], phi_share=4)
    old = MultiScaleVQVAE(**kwargs, phi_rule="legacy").eval()
    old_config = {k: v for k, v in old.config.items() if k not in ("phi_rule", "arch")}
    save_torch({"config": old_config, "state_dict": old.state_dict()}, tmp_path / "tok.pt")
    loaded = load_tokenizer(tmp_path / "tok.pt")
    assert loaded.quantizer.phi_of_scale == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
    images = torch.rand(3, 1, 32, 32) * 2 - 1
    for a, b in zip(old.encode(images), loaded.encode(images), strict=True):
        assert torch.equal(a, b)
    new = MultiScaleVQVAE(**kwargs)
    assert new.config["phi_rule"] == "var" and new.quantizer.phi_of_scale == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_var_arch_tokenizer_trains_like_the_conv_arch():
    """`tokenizer.arch: var` is also a from-scratch option: the training
    forward (straight-through, partial decode) runs and reaches every part."""
    model = MultiScaleVQVAE(in_channels=3, arch="var", base_width=32, ch_mult=[1, 2],
                            res_blocks=1, latent_channels=4, vocab_size=16,
                            patch_nums=[1, 2, 4, 8], phi_share=2).train()
    assert model.downsample == 2 and model.config["ch_mult"] == [1, 2]
    out = model(torch.rand(2, 3, 16, 16) * 2 - 1, partial_k=2)
    assert out.recon.shape == out.partial.shape == (2, 3, 16, 16)
    (out.recon.square().mean() + out.partial.square().mean() + out.quantized.vq_loss).backward()
    for name in ("encoder.conv_in.weight", "encoder.quant_conv.weight",
                 "decoder.post_quant_conv.weight", "quantizer.phis.0.conv.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


# -- numerics against VAR's outputs ------------------------------------------------

def test_imported_vqvae_computes_vars_tokens_and_images(models, ref):
    """Per-scale indices identical, latent, f_hat after each scale, teacher-forcing
    input and reconstruction within 1e-4 of VAR's."""
    var, vae = models
    x = to_float(ref["images_u8"])
    with torch.no_grad():
        f = vae.latent(x)
        q = vae.quantizer(f)
        recon = vae.fhat_to_image(q.f_hats[-1])
        var_input = vae.indices_to_var_input(_grids(ref["indices"], vae.patch_nums))
    assert vae.quantizer.phi_of_scale == ref["phi_of_scale"]
    torch.testing.assert_close(f, ref["f"], atol=1e-4, rtol=0)
    for k, (ours, theirs) in enumerate(zip(q.indices, ref["indices"], strict=True)):
        assert torch.equal(ours.flatten(1), theirs), f"scale {k}"
    for ours, theirs in zip(q.f_hats, ref["f_hat_after_scale"], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(recon, ref["reconstruction"], atol=1e-4, rtol=0)
    torch.testing.assert_close(var_input, ref["var_input"], atol=1e-4, rtol=0)


def test_imported_transformer_gives_vars_logits(models, ref):
    var, _ = models
    with torch.no_grad():
        logits = var(ref["labels"], ref["var_input"])
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)


def test_greedy_guided_sampling_gives_vars_tokens(models, ref):
    """Top-k 1 makes sampling the argmax of VAR's guided logits: the KV-cache
    path, the guidance schedule and the next-scale input must all match."""
    var, vae = models
    _, indices, _ = sample(var, vae, ref["labels"], guidance=ref["greedy_cfg"],
                           guidance_schedule="linear", top_k=1,
                           generator=torch.Generator().manual_seed(0),
                           code_to_cluster=torch.arange(vae.vocab_size) % 8, num_clusters=8)
    for k, (ours, theirs) in enumerate(zip(indices, ref["greedy_indices"], strict=True)):
        assert torch.equal(ours.flatten(1), theirs), f"scale {k}"


# -- export ------------------------------------------------------------------------

def test_export_gives_vars_state_dicts_and_reimports_identically(models, var_state, vae_state):
    """Exported dicts carry VAR's keys in VAR's order with VAR's shapes (its
    own tensors back, even its buffers), and export -> import is the identity."""
    var, vae = models
    for ours, theirs, again in [(export_var(var), var_state, import_var),
                                (export_vae(vae), vae_state,
                                 lambda s: import_vae(s, var.patch_nums))]:
        assert list(ours) == list(theirs)
        assert shapes_of(ours) == shapes_of(theirs)
        for key, value in theirs.items():
            assert torch.equal(ours[key], value.to(ours[key].dtype)), key
        model = var if again is import_var else vae
        reimported = again(ours).state_dict()
        for key, value in model.state_dict().items():
            assert torch.equal(reimported[key], value), key


# -- full-size released checkpoints, on the meta device ----------------------------

MANIFEST = json.loads((FIXTURE / "manifest_full_size.json").read_text())


@pytest.mark.parametrize("name", ["var_d16", "var_d20", "var_d24", "var_d30"])
def test_full_size_transformers_match_the_manifest(name):
    """Sizes inferred from the released file's shapes build a model with
    exactly its keys, shapes and parameter count (d16: 310,283,520)."""
    manifest = MANIFEST[name]
    config = infer_var_config(manifest)
    depth = int(name.removeprefix("var_d"))
    assert (config["depth"], config["width"], config["heads"]) == (depth, 64 * depth, depth)
    assert (config["vocab_size"], config["latent_channels"], config["num_classes"]) == (4096, 32, 1000)
    model = build_var(config, "meta")
    exported = export_var(model)
    assert list(exported) == list(manifest)
    assert shapes_of(exported) == shapes_of(manifest)
    assert model.num_parameters() == MANIFEST[f"{name}_num_params"]


def test_full_size_vqvae_matches_the_manifest():
    manifest = MANIFEST["vae_ch160v4096z32"]
    config = infer_vae_config(manifest)
    assert (config["base_width"], config["ch_mult"], config["res_blocks"]) == (160, [1, 1, 2, 2, 4], 2)
    assert (config["vocab_size"], config["latent_channels"], config["phi_share"]) == (4096, 32, 4)
    model = build_vae(config, "meta")
    assert model.downsample == 16
    exported = export_vae(model)
    assert list(exported) == list(manifest)
    assert shapes_of(exported) == shapes_of(manifest)


# -- bad input ---------------------------------------------------------------------

def test_bad_state_dicts_name_the_first_mismatch(var_state, vae_state):
    """A wrong file must fail before any weight is loaded, naming the key."""
    missing = {k: v for k, v in var_state.items() if k != "blocks.1.ffn.fc2.bias"}
    with pytest.raises(StageError, match=r"missing key 'blocks\.1\.ffn\.fc2\.bias'"):
        import_var(missing)
    reshaped = {**var_state, "head.bias": torch.zeros(65)}
    with pytest.raises(StageError, match=r"key 'head\.bias' has shape \[65\], expected \[64\]"):
        import_var(reshaped)
    extra = {**vae_state, "quantize.extra": torch.zeros(1)}
    with pytest.raises(StageError, match=r"unexpected key 'quantize\.extra'"):
        import_vae(extra)
    with pytest.raises(StageError, match="missing key 'encoder.conv_in.weight'"):
        import_vae(var_state)


# -- the commands ------------------------------------------------------------------

@pytest.fixture
def project(tmp_path, monkeypatch):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tokenizer"]["semantic_clusters"] = 8
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_import_then_export_commands(project, models, ref, var_state, vae_state):
    """`up import-var` writes checkpoints the pipeline loads (tokenizer with
    code clusters, a models/var-*.pt); `up export-var` gives VAR's files back."""
    from up.core.params import load_params

    written = import_checkpoints(load_params(), FIXTURE / "vae.pth", FIXTURE / "var.pth",
                                 Path("models/tokenizer.pt"), None, None)
    assert written == [Path("models/tokenizer.pt"), Path("models/var-d2-imported.pt")]
    tok, var = load_tokenizer("models/tokenizer.pt"), load_var("models/var-d2-imported.pt")
    code_to_cluster, num_clusters = load_code_clusters("models/tokenizer.pt")
    assert num_clusters == 8 and code_to_cluster.shape == (64,)
    assert tok.config["arch"] == "var" and tok.config["phi_rule"] == "var"
    with torch.no_grad():
        torch.testing.assert_close(var(ref["labels"], ref["var_input"]), ref["logits"],
                                   atol=1e-4, rtol=0)
    outs = export_checkpoints(Path("models/tokenizer.pt"), Path("models/var-d2-imported.pt"),
                              None, None, ema=True)
    assert outs == [Path("exported/vae_ch32v64z8.pth"), Path("exported/var_d2.pth")]
    for path, theirs in zip(outs, (vae_state, var_state), strict=True):
        ours = torch.load(path, weights_only=True)
        assert list(ours) == list(theirs)
        assert all(torch.equal(ours[k], v) for k, v in theirs.items())


def test_import_command_reports_bad_input_in_one_line(project):
    result = CliRunner().invoke(app, ["import-var", "--var", str(FIXTURE / "vae.pth")])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing key 'class_emb.weight'" in lines[0]


# -- a subset of the classes (--class-rows) -----------------------------------------

def test_class_rows_cut_the_embedding_and_nothing_else(models, var_state, ref):
    """Rows [3, 1] of the 10-class fixture: a 2-class model whose label 0 is the
    full model's class 3 (same logits), whose null class is the full model's, and
    whose other weights are the same tensors."""
    full, _ = models
    cut = select_class_rows(var_state, [3, 1])
    assert list(cut) == list(var_state)
    assert torch.equal(cut["class_emb.weight"], var_state["class_emb.weight"][[3, 1, 10]])
    assert all(cut[k] is v for k, v in var_state.items() if k != "class_emb.weight")
    sub = import_var(cut)
    assert sub.num_classes == 2 and infer_var_config(cut)["num_classes"] == 2
    full_state = full.state_dict()
    for key, value in sub.state_dict().items():
        if key != "class_emb.weight":
            assert torch.equal(value, full_state[key]), key
    x = ref["var_input"]
    with torch.no_grad():
        for ours, theirs in [([0, 1], [3, 1]), ([1, 0], [1, 3]), ([2, 2], [10, 10])]:
            torch.testing.assert_close(sub(torch.tensor(ours), x), full(torch.tensor(theirs), x),
                                       atol=0, rtol=0)


@pytest.mark.parametrize(("rows", "message"), [
    ([], "no class rows given"),
    ([10], r"class index 10 is out of range: the class embedding has classes 0\.\.9"),
    ([-1], "class index -1 is out of range"),
    ([3, 1, 3], "class index 3 is listed more than once"),
    (["3"], "'3' is not an integer"),
])
def test_bad_class_rows_stop_before_any_weight(var_state, rows, message):
    with pytest.raises(StageError, match=message):
        select_class_rows(var_state, rows)


def test_class_rows_specs(tmp_path):
    """A comma list or a file of indices (# comments) in our label order; bad
    entries are one-line errors naming the entry."""
    assert parse_class_rows("3,1", None, 10) == [3, 1]
    assert parse_class_rows(" 7 , 0 ,", None, 10) == [7, 0]
    spec = tmp_path / "rows.txt"
    spec.write_text("# label order: cat, dog\n3  # a cat class\n\n1\n")
    assert parse_class_rows(str(spec), None, 10) == [3, 1]
    for bad, message in [("3,x", r"'x' is not an integer class index \(class names such as "
                                  r"WordNet IDs need --imagenet-root\)"),
                         ("2.0", "'2.0' is not an integer"),
                         ("", "no class rows given"),
                         (",", "no class rows given"),
                         ("4,4", "class index 4 is listed more than once"),
                         ("0,10", "class index 10 is out of range"),
                         (str(tmp_path / "missing.txt"), "missing.txt: no such file")]:
        with pytest.raises(StageError, match=message):
            parse_class_rows(bad, None, 10)
    spec.write_text("# nothing but comments\n")
    with pytest.raises(StageError, match=r"--class-rows file .*rows\.txt: no class rows given"):
        parse_class_rows(str(spec), None, 10)


def _fake_imagenet(root: Path, count: int) -> list[str]:
    """``count`` empty WordNet-ID folders, made out of order; returns them sorted."""
    wnids = [f"n{1440764 + 97 * i:08d}" for i in range(count)]
    for wnid in reversed(wnids):
        (root / wnid).mkdir(parents=True)
    (root / "README.txt").write_text("a file, not a class")
    return sorted(wnids)


def test_wordnet_ids_map_through_the_sorted_train_folder(tmp_path):
    """With --imagenet-root, names are folder positions in sorted order; labels
    follow that order (as data.classes relabels), so the rows come out ascending."""
    wnids = _fake_imagenet(tmp_path / "train", 10)
    spec = tmp_path / "subset.txt"
    spec.write_text(f"# a subset\n{wnids[7]}\n{wnids[2]}\n{wnids[5]}  # trailing comment\n")
    assert parse_class_rows(str(spec), tmp_path / "train", 10) == [2, 5, 7]
    assert parse_class_rows(f"{wnids[9]},{wnids[0]}", tmp_path / "train", 10) == [0, 9]
    with pytest.raises(StageError, match=r"class 'n99999999' is not a folder of --imagenet-root"):
        parse_class_rows(f"{wnids[1]},n99999999", tmp_path / "train", 10)
    with pytest.raises(StageError, match=f"class '{wnids[1]}' is listed more than once"):
        parse_class_rows(f"{wnids[1]},{wnids[1]}", tmp_path / "train", 10)
    with pytest.raises(StageError, match="has 10 class folders, the class embedding 1000 classes"):
        parse_class_rows(str(spec), tmp_path / "train", 1000)
    with pytest.raises(StageError, match="is not a folder"):
        parse_class_rows(str(spec), tmp_path / "nowhere", 10)


def test_import_command_with_class_rows(project, models, ref):
    """`up import-var --class-rows` writes a checkpoint of len(rows) classes that
    loads like any other (default name marks the subset); WordNet IDs work the
    same through --imagenet-root; bad specs are one line, exit 1."""
    full, _ = models
    (project / "rows.txt").write_text("3\n1\n")
    result = CliRunner().invoke(app, ["import-var", "--var", str(FIXTURE / "var.pth"),
                                      "--class-rows", "rows.txt"])
    assert result.exit_code == 0, result.output
    assert "wrote models/var-d2-imported-2classes.pt" in result.stdout
    sub = load_var("models/var-d2-imported-2classes.pt")
    assert sub.num_classes == 2
    saved = torch.load("models/var-d2-imported-2classes.pt", weights_only=True)
    assert saved["variant"]["class_rows"] == [3, 1]
    with torch.no_grad():
        torch.testing.assert_close(sub(torch.tensor([0, 2]), ref["var_input"]),
                                   full(torch.tensor([3, 10]), ref["var_input"]), atol=0, rtol=0)

    wnids = _fake_imagenet(project / "imagenet" / "train", 10)
    (project / "wnids.txt").write_text(f"{wnids[6]}\n{wnids[4]}\n")
    result = CliRunner().invoke(app, ["import-var", "--var", str(FIXTURE / "var.pth"),
                                      "--class-rows", "wnids.txt", "--imagenet-root",
                                      "imagenet/train", "--var-out", "models/var-subset.pt"])
    assert result.exit_code == 0, result.output
    saved = torch.load("models/var-subset.pt", weights_only=True)
    assert saved["variant"]["class_rows"] == [4, 6] and saved["config"]["num_classes"] == 2
    assert torch.equal(saved["state_dict"]["class_emb.weight"],
                       full.class_emb.weight[[4, 6, 10]])

    for args, message in [(["--class-rows", "3,3"], "class index 3 is listed more than once"),
                          (["--class-rows", "12"], "class index 12 is out of range"),
                          (["--class-rows", "3,cat"], "'cat' is not an integer class index"),
                          (["--class-rows", "wnids.txt"], f"'{wnids[6]}' is not an integer"),
                          (["--class-rows", "n00000000", "--imagenet-root", "imagenet/train"],
                           "class 'n00000000' is not a folder of --imagenet-root")]:
        result = CliRunner().invoke(app, ["import-var", "--var", str(FIXTURE / "var.pth"), *args])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], result.stderr
    result = CliRunner().invoke(app, ["import-var", "--vae", str(FIXTURE / "vae.pth"),
                                      "--class-rows", "3,1"])
    assert result.exit_code == 1 and "give --var too" in result.stderr


def test_paper_profiles_class_rows_fit_var_d16(tmp_path):
    """The profiles' import commands on var_d16's shapes: profiles/imagenet100.txt
    through a 1000-folder train root gives its 100 rows in sorted-WNID order, and the
    cut embedding makes a 100-class (AFHQ: 3-class) d16, all else as released."""
    from up.data.sources import read_class_file

    wnids = read_class_file(ROOT / "profiles/imagenet100.txt")
    others = [f"n{i:08d}" for i in range(1000 - len(wnids))]  # below every real WNID
    for name in wnids + others:
        (tmp_path / "train" / name).mkdir(parents=True)
    rows = parse_class_rows(str(ROOT / "profiles/imagenet100.txt"), tmp_path / "train", 1000)
    assert rows == [900 + i for i in range(100)]  # the 100 sort after the 900 fillers
    manifest = MANIFEST["var_d16"]
    for spec, root, classes in [(str(ROOT / "profiles/imagenet100.txt"), tmp_path / "train", 100),
                                ("281,207,291", None, 3)]:
        state = {k: torch.empty(0) if k != "class_emb.weight" else torch.zeros(shape)
                 for k, shape in manifest.items()}
        cut = select_class_rows(state, parse_class_rows(spec, root, 1000))
        shapes = {**manifest, "class_emb.weight": list(cut["class_emb.weight"].shape)}
        config = infer_var_config(shapes)
        assert config["num_classes"] == classes and config["depth"] == 16
        assert shapes_of(export_var(build_var(config, "meta"))) == shapes_of(shapes)
