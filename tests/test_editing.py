"""Editing: forced tokens in the sampler, the mask-to-scale rule, bad masks, the
measures on cases with a known answer, the edit stage, `up edit` and the report."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from tests.project import params_dict, save_prepared
from tests.test_sampling import CLASSES, CLUSTERS, CODE_TO_CLUSTER, PATCH_NUMS, build_models, save_models
from up.core.io import load_torch, save_json
from up.evaluation import editing as measures
from up.evaluation.evaluator import Evaluator, save_evaluator
from up.generation.editing import (
    MaskError,
    check_mask,
    edit,
    edit_batches,
    encode,
    mask_from_image,
    named_mask,
    scale_masks,
    uncertainty_map,
)
from up.generation.sampler import batch_generator, sample
from up.models.tokenizer import to_float, to_uint8

SIDE = 8  # the test tokenizer's images: 8 x 8, latent 4 x 4, scales 1, 2, 3, 4
SETTINGS = dict(guidance=1.5, guidance_schedule="linear", code_to_cluster=CODE_TO_CLUSTER,
                num_clusters=CLUSTERS)


@pytest.fixture(scope="module")
def models():
    return build_models()


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, SIDE, SIDE), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


LABELS = torch.tensor([0, 1, 2, 3, 4, 1])


def edited(models, masks, seed=0, labels=LABELS, x=None):
    var, tok = models
    x = images() if x is None else x
    return edit(var, tok, encode(tok, x, 4), masks, labels,
                generator=torch.Generator().manual_seed(seed), **SETTINGS)


# -- the sampler with forced tokens ------------------------------------------------

def test_empty_mask_gives_the_tokenizers_reconstruction(models):
    """Nothing masked: every token is the image's own and the output is the tokenizer's
    reconstruction, bitwise."""
    var, tok = models
    x = images()
    out = edited(models, torch.zeros(len(x), SIDE, SIDE, dtype=torch.bool), x=x)
    with torch.no_grad():
        own = tok.encode(to_float(x))
        recon = to_uint8(tok.decode(own))
    for drawn, mine in zip(out.tokens, own, strict=True):
        assert torch.equal(drawn, mine)
    assert torch.equal(out.images, recon)
    assert not any(u.any() for u in out.unknown)


def test_full_mask_is_sample_bitwise(models):
    """Everything masked: the tokens, images and uncertainty of ``sample`` with the
    same generator seed and labels."""
    var, tok = models
    out = edited(models, torch.ones(len(LABELS), SIDE, SIDE, dtype=torch.bool), seed=3)
    ref_images, ref_tokens, ref_unc = sample(var, tok, LABELS, generator=torch.Generator().manual_seed(3),
                                             **SETTINGS)
    assert torch.equal(out.images, ref_images)
    for a, b in zip(out.tokens, ref_tokens, strict=True):
        assert torch.equal(a, b)
    for name, scales in ref_unc["maps"].items():
        for a, b in zip(out.maps[name], scales, strict=True):
            assert torch.equal(a, b), name


def test_full_masks_in_batches_are_the_sample_stages_streams(models):
    """edit_batches draws batch b from batch_generator(seed, b), as sample_many does."""
    var, tok = models
    labels = torch.tensor([0, 1, 2, 3, 4])
    out = edit_batches(var, tok, images(5), torch.ones(5, SIDE, SIDE, dtype=torch.bool), labels,
                       fills=1, batch_size=2, seed=7, **SETTINGS)
    by_hand = torch.cat([sample(var, tok, labels[s:s + 2], generator=batch_generator(7, b, "cpu"),
                                **SETTINGS)[0] for b, s in enumerate(range(0, 5, 2))])
    assert torch.equal(out.images, by_hand)


def test_fills_are_rows_of_their_image(models):
    """fills=3: rows 3i .. 3i+2 edit image i (its own known tokens), in batches that
    split the fills of one image."""
    var, tok = models
    x = images(4)
    masks = named_mask("right_half", SIDE).expand(4, -1, -1)
    out = edit_batches(var, tok, x, masks, torch.tensor([0, 1, 2, 3]), fills=3, batch_size=5,
                       seed=1, **SETTINGS)
    own = encode(tok, x, 4)
    for k, unknown in enumerate(out.unknown):
        known = own[k].repeat_interleave(3, 0)
        assert torch.equal(out.tokens[k][~unknown], known[~unknown])
    assert out.images.shape == (12, 1, SIDE, SIDE)


@pytest.mark.parametrize("spec", ["left_half", "center", "box 1 2 4 7"])
def test_known_tokens_are_never_resampled(models, spec):
    """Under any seed, the cells the rule calls known hold the image's tokens, and the
    sampled cells change with the seed somewhere."""
    var, tok = models
    x = images()
    masks = named_mask(spec, SIDE).expand(len(x), -1, -1)
    with torch.no_grad():
        own = tok.encode(to_float(x))
    runs = [edited(models, masks, seed=s, x=x) for s in range(3)]
    varied = False
    for k in range(len(PATCH_NUMS)):
        unknown = runs[0].unknown[k]
        assert torch.equal(unknown, scale_masks(masks, PATCH_NUMS)[k])
        for run in runs:
            assert torch.equal(run.tokens[k][~unknown], own[k][~unknown])
        varied |= not torch.equal(runs[0].tokens[k][unknown], runs[1].tokens[k][unknown])
    assert varied


# -- the mask-to-scale rule ---------------------------------------------------------

def test_rule_on_one_two_and_four_cells():
    """A 4 x 4 image: one masked pixel (1, 2) (row, column). At 1 cell the cell is
    sampled; at 2 x 2 only the top-right cell; at 4 x 4 only the pixel's own cell; with
    nothing masked every cell is known."""
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = True
    one, two, four = scale_masks(mask, [1, 2, 4])
    assert one.tolist() == [[[True]]]
    assert two.tolist() == [[[False, True], [False, False]]]
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1, 2] = True
    assert torch.equal(four[0], expected)
    assert not any(s.any() for s in scale_masks(torch.zeros(1, 4, 4, dtype=torch.bool), [1, 2, 4]))


def test_rule_samples_partly_masked_cells_of_overlapping_bins():
    """3 cells over 4 pixels: bins rows/columns {0,1}, {1,2}, {2,3}. Pixel (1, 1) lies in
    bins 0 and 1 of each axis: the 2 x 2 top-left cells are sampled, the rest known."""
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1, 1] = True
    (three,) = scale_masks(mask, [3])
    assert three[0].tolist() == [[True, True, False], [True, True, False], [False, False, False]]
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 3, 0] = True  # a corner pixel lies in one bin per axis
    (three,) = scale_masks(mask, [3])
    assert torch.nonzero(three[0]).tolist() == [[2, 0]]


def test_named_masks():
    assert named_mask("center", 8)[2:6, 2:6].all() and named_mask("center", 8).sum() == 16
    assert named_mask("left_half", 8)[:, :4].all() and named_mask("left_half", 8).sum() == 32
    assert named_mask("right_half", 8)[:, 4:].all() and named_mask("right_half", 8).sum() == 32
    assert named_mask("top", 8)[:4].all() and named_mask("bottom", 8)[4:].sum() == 32
    box = named_mask("box 1 2 4 7", 8)  # columns 1..3, rows 2..6
    assert box.sum() == 3 * 5 and box[2, 1] and box[6, 3] and not box[7, 3] and not box[2, 4]


# -- bad masks: one line naming the input -------------------------------------------

@pytest.mark.parametrize("spec, words", [
    ("triangle", "'triangle': unknown shape"), ("", "unknown shape"),
    ("center 3", "unknown shape"), ("box 1 2 3", "four integers"),
    ("box 4 0 2 8", "0 <= x0 < x1 <= 8"), ("box 0 0 9 8", "0 <= x0 < x1 <= 8")])
def test_bad_named_masks(spec, words):
    with pytest.raises(MaskError, match=words) as err:
        named_mask(spec, 8)
    assert "\n" not in str(err.value)


def test_bad_mask_images(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    small = tmp_path / "small.png"
    Image.new("L", (4, 8), 255).save(small)
    for path, words in ((empty, "the file is empty"), (junk, "unreadable"),
                        (small, "4 x 8 pixels, the images are 8 x 8"),
                        (tmp_path / "none.png", "not a file")):
        with pytest.raises(MaskError, match=words) as err:
            mask_from_image(path, 8)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    good = tmp_path / "good.png"
    pixels = np.zeros((8, 8), np.uint8)
    pixels[:, 5:] = 255
    Image.fromarray(pixels).save(good)
    assert torch.equal(mask_from_image(good, 8), named_mask("box 5 0 8 8", 8))


def test_masks_of_nothing_or_everything_are_refused():
    with pytest.raises(MaskError, match="masks no pixel"):
        check_mask(torch.zeros(8, 8, dtype=torch.bool), "'box'")
    with pytest.raises(MaskError, match="masks every pixel"):
        check_mask(named_mask("box 0 0 8 8", 8), "'box 0 0 8 8'")
    assert check_mask(named_mask("center", 8), "center").sum() == 16


# -- the measures, on cases with a known answer ---------------------------------------

def test_uncertainty_map_by_hand():
    """Scales 1 and 2 over a 2 x 2 map: over the finest scale's sampled cells, the mean
    over the scales whose covering cell was sampled; NaN outside them."""
    scales = [torch.tensor([[[4.0]]]), torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])]
    unknown = [torch.tensor([[[True]]]), torch.tensor([[[True, False], [True, True]]])]
    got = uncertainty_map(scales, unknown)
    assert got[0, 0, 0] == 2.5 and got[0, 1, 0] == 3.5 and got[0, 1, 1] == 5.0
    assert got[0, 0, 1].isnan()  # known at the finest scale: outside the map
    unknown = [torch.tensor([[[False]]]), torch.tensor([[[True, False], [False, False]]])]
    got = uncertainty_map(scales, unknown)
    assert got[0, 0, 0] == 1.0 and got[0, 1].isnan().all() and got[0, 0, 1].isnan()


def test_psnr_by_hand():
    """One known pixel off by 10 of 4 known pixels: MSE 25, PSNR 10 log10(255^2 / 25)."""
    original = torch.zeros(1, 1, 2, 4, dtype=torch.uint8)
    image = original.clone()
    image[0, 0, 0, 0] = 10
    image[0, 0, :, 2:] = 200  # masked: not counted
    keep = torch.zeros(1, 2, 4, dtype=torch.bool)
    keep[0, :, :2] = True
    assert measures.psnr(image, original, keep).item() == pytest.approx(10 * math.log10(255 ** 2 / 25))
    assert measures.psnr(original, original, keep).item() == pytest.approx(100 + 10 * math.log10(255 ** 2))


def test_fill_diversity_and_disagreement_by_hand():
    feats = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])
    assert measures.fill_diversity(feats).tolist() == [5.0]
    fills = torch.zeros(1, 2, 1, 2, 2, dtype=torch.uint8)
    fills[0, 1, 0, 0, 0] = 10  # variance 25 at one pixel of four
    assert measures.disagreement(fills, 1).flatten().tolist() == [25 / 4]
    assert measures.disagreement(fills, 2)[0].tolist() == [[25.0, 0.0], [0.0, 0.0]]


def test_repetition_of_a_copy_and_a_reflection_is_one():
    """Features = the flattened pixels: a right half equal to the left half, or to its
    mirror image, gives similarity 1 under right_half; a different half less."""
    def features(x):
        return x.flatten(1).float(), None

    left = torch.randint(1, 255, (1, 1, 4, 2), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)
    copy, mirror = torch.cat([left, left], -1), torch.cat([left, left.flip(-1)], -1)
    other = torch.cat([left, torch.full_like(left, 7)], -1)
    for image in (copy, mirror):
        assert measures.repetition(image, "right_half", features).item() == pytest.approx(1.0)
    assert measures.repetition(other, "right_half", features).item() < 0.99
    top = copy.transpose(-1, -2)  # the known half on top: a copy under 'bottom'
    assert measures.repetition(top, "bottom", features).item() == pytest.approx(1.0)
    generated, known, axis = measures.halves(copy, "left_half")
    assert axis == -1 and torch.equal(generated, left) and torch.equal(known, left)


def test_a_map_equal_to_the_disagreement_scores_one_and_a_shuffled_one_chance():
    gen = torch.Generator().manual_seed(0)
    disagree = torch.rand(400, 4, 4, generator=gen, dtype=torch.float64)
    region = torch.zeros(400, 4, 4, dtype=torch.bool)
    region[:, :, 1:] = True  # 12 locations each
    rho, auroc = measures.map_agreement(disagree.float(), disagree, region)
    assert np.allclose(rho, 1.0) and np.allclose(auroc, 1.0)
    rho, auroc = measures.map_agreement(-disagree.float(), disagree, region)
    assert np.allclose(rho, -1.0) and np.allclose(auroc, 0.0)
    shuffled = measures.shuffled(disagree.float(), region, np.random.default_rng(1))
    assert torch.equal(shuffled[~region], disagree.float()[~region])
    assert torch.equal(shuffled[0][region[0]].sort().values, disagree.float()[0][region[0]].sort().values)
    rho, auroc = measures.map_agreement(shuffled, disagree, region)
    assert abs(rho.mean()) < 0.05 and abs(auroc.mean() - 0.5) < 0.05
    flat = measures.map_agreement(torch.ones(1, 4, 4), disagree[:1], region[:1])
    assert np.isnan(flat[0]).all()  # a constant map has no rank correlation


def test_score_task_on_a_constructed_task():
    """Two images, K = 2 fills: image 0's fills equal the original (its known PSNR is the
    floor's 148 dB, its fills do not differ: diversity 0, no rank correlation); image 1's
    fills differ by 8 at one masked pixel only. The 'evaluator' reads the class off the
    first pixel."""
    def features(x):
        flat = x.flatten(1).double()
        return flat, torch.nn.functional.one_hot(x[:, 0, 0, 0].long() % 2, 2).double()

    originals = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    originals[1, 0, 0, 0] = 1  # class 1 by the first pixel
    fills = originals[:, None].repeat(1, 2, 1, 1, 1)
    fills[1, 1, 0, 3, 3] = 8
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, 2:, 2:] = True
    region = torch.zeros(2, 2, 2, dtype=torch.bool)
    region[:, 1, 1] = True
    region[:, 0, 1] = True
    maps = torch.rand(2, 2, 2, 2).masked_fill(~region[:, None], torch.nan)
    task = measures.TaskInputs(None, fills, originals, originals, masks, torch.tensor([0, 0]),
                               maps, region)
    real = (torch.rand(12, 16).double(), torch.arange(2).repeat(6))
    out = measures.score_task(task, features, real, realism_k=2, repeats=3, seed=0)
    assert out["accuracy"].tolist() == [1.0, 0.0]
    assert out["known_psnr"] == pytest.approx([100 + 10 * math.log10(255 ** 2)] * 2)
    assert out["diversity"].tolist() == [0.0, 8.0]
    assert np.isnan(out["spearman"][0]) and np.isnan(out["repetition"]).all()
    assert out["realism"].shape == (4,)


def test_pooled_figures_and_their_intervals():
    rows = {key: np.array([0.2, 0.4]) for key in measures.UNIT_KEYS}
    rows["realism"] = np.array([1.0, 2.0, 3.0, 4.0])
    shifted = {**rows, "accuracy": np.array([0.0, 0.5]), "spearman": np.array([0.6, math.nan])}
    out = measures.figures({"center": rows, "center+class1": shifted}, ["center+class1"],
                           repeats=200, seed=0)
    assert out["edit_class_accuracy"] == pytest.approx(0.3)
    assert out["edit_class_edit_accuracy"] == pytest.approx(0.25)
    assert out["edit_spearman"] == pytest.approx(0.4)  # NaN left out
    assert out["edit_spearman_lo"] <= out["edit_spearman"] <= out["edit_spearman_hi"]
    assert out["edit_spearman_lo"] >= 0.2 and out["edit_spearman_hi"] <= 0.6
    assert out["edit_realism_median"] == 2.5
    keys = {m.key for m in measures.METRICS}
    assert set(out) == keys
    alone = measures.figures({"center": rows}, [], repeats=10, seed=0)
    assert alone["edit_class_edit_accuracy"] is None


# -- the stage, `up edit` and the report --------------------------------------------

@pytest.fixture
def project(tmp_path, monkeypatch, models):
    """A project with params.yaml, the test tokenizer, a `ce` model, an evaluator and
    prepared 8 x 8 images of 5 classes (8 train and 3 test images each)."""
    var, tok = models
    params = params_dict(device="cpu", threads=1,
                         sample={"batch_size": 8, "guidance": 1.5},
                         evaluate={"realism_k": 2, "bootstrap": 50},
                         edit={"masks": ["center", "right_half"], "images_per_class": 2,
                               "fills_per_image": 2, "class_shift": 1, "grid_rows": 3})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    save_models(models, tmp_path)
    torch.manual_seed(0)
    save_evaluator(Evaluator(1, CLASSES, [4, 8], 8).eval(), tmp_path / "models" / "evaluator.pt")
    splits = {name: (images(n * CLASSES, seed=i), torch.arange(CLASSES).repeat(n))
              for i, (name, n) in enumerate((("train", 8), ("val", 1), ("test", 3)))}
    save_prepared(tmp_path / "data" / "prepared", splits, [str(c) for c in range(CLASSES)])
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_edit_stage_writes_every_measure_and_grid(project):
    from stages import edit as stage
    from up.core.params import load_params
    from up.evaluation.metrics import summary_keys

    stage.run(load_params(), "ce", 0)
    metrics = json.loads((project / "metrics/edit-ce-s0.json").read_text())
    assert set(summary_keys(measures.METRICS)) <= set(metrics)
    assert metrics["n_real"] == 2 * CLASSES and metrics["n_samples"] == 2 * CLASSES * 2 * 4
    assert list(metrics["tasks"]) == ["center", "right_half", "center+class1", "right_half+class1"]
    assert metrics["tasks"]["center"]["repetition"] is None
    assert metrics["edit_repetition"] is not None and metrics["edit_class_edit_accuracy"] is not None
    assert 0 <= metrics["edit_auroc"] <= 1 and -1 <= metrics["edit_spearman"] <= 1
    for task in metrics["tasks"]:
        assert Image.open(project / "edits/ce-s0" / f"{task}.png").size[0] > 200


def test_edit_stage_refuses_a_bad_mask_before_any_work(project):
    from stages import edit as stage
    from up.core.params import ParamsError, load_params

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["edit"]["masks"] = ["center", "hexagon"]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError) as err:
        stage.run(load_params(), "ce", 0)
    assert err.value.lines == ["params.yaml: edit.masks: mask 'hexagon': unknown shape (one of "
                               "center, left_half, right_half, top, bottom, 'box x0 y0 x1 y1')"]
    assert not (project / "metrics").exists()


def test_up_edit_on_an_image_file(project, models):
    from stages.cli import app

    pixels = np.random.default_rng(0).integers(0, 256, (6, 5), dtype=np.uint8)
    Image.fromarray(pixels).save(project / "mine.png")  # padded onto black to 8 x 8
    result = CliRunner().invoke(app, ["edit", "--variant", "ce", "--image", "mine.png",
                                      "--mask", "left_half", "--class", "2", "--fills", "3",
                                      "--out", "out"])
    assert result.exit_code == 0, result.output
    out = project / "out"
    assert (out / "grid.png").is_file() and len(list(out.glob("fill-0-*.png"))) == 3
    saved = load_torch(out / "uncertainty.pt")
    maps, mask = saved["maps"], saved["mask"]
    assert maps.shape == (1, 3, 4, 4) and torch.equal(mask, named_mask("left_half", SIDE))
    assert maps[..., :2].isfinite().all() and maps[..., 2:].isnan().all()
    fill = torch.from_numpy(np.array(Image.open(out / "fill-0-0.png").convert("L")))
    assert fill.shape == (SIDE, SIDE)


@pytest.mark.parametrize("args, words", [
    (["--mask", "triangle"], "mask 'triangle': unknown shape"),
    (["--mask", "box 0 0 8 8"], "masks every pixel"),
    (["--mask-image", "empty.png"], "empty.png: the file is empty"),
    (["--mask-image", "wide.png"], "wide.png: 9 x 8 pixels, the images are 8 x 8"),
    (["--mask", "center"], "give its requested class with --class"),
])
def test_up_edit_bad_inputs_are_one_line_errors(project, args, words):
    from stages.cli import app

    (project / "empty.png").write_bytes(b"")
    Image.new("L", (9, 8), 0).save(project / "wide.png")
    Image.new("L", (8, 8), 0).save(project / "mine.png")
    extra = [] if "--class" in words else ["--class", "1"]
    result = CliRunner().invoke(app, ["edit", "--variant", "ce", "--image", "mine.png", *args,
                                      *extra])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr


def test_up_edit_options_need_an_image_or_a_split(project):
    from stages.cli import app

    result = CliRunner().invoke(app, ["edit", "--variant", "ce", "--mask", "top"])
    assert result.exit_code == 2 and "--mask: only with --image FILE or --split NAME" in result.stderr


def test_report_has_the_editing_table_and_paired_differences(tmp_path, monkeypatch):
    from stages.report import run
    from tests.test_report import make_project
    from up.core.params import load_params

    make_project(tmp_path, ["ce", "up"], [0, 1])
    keys = [m.key for m in measures.METRICS]
    for i, variant in enumerate(("ce", "up")):
        for seed in (0, 1):
            values = {key: 0.5 + 0.1 * i + 0.01 * seed for key in keys}
            save_json({**values, "n_samples": 80, "n_real": 20, "feature_extractor": "evaluator"},
                      tmp_path / "metrics" / f"edit-{variant}-s{seed}.json")
    monkeypatch.chdir(tmp_path)
    run(load_params())
    text = (tmp_path / "results/summary.md").read_text()
    assert "## Editing" in text and "### Editing, paired with `ce`" in text
    summary = json.loads((tmp_path / "results/summary.json").read_text())["edit"]
    assert summary["variants"]["up"]["metrics"]["edit_auroc"]["mean"] == pytest.approx(0.605)
    assert summary["paired"]["ce"]["up"]["edit_auroc"]["mean"] == pytest.approx(0.1)
    assert (tmp_path / "results/editing.png").is_file()
