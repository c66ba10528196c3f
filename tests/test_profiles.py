"""The profiles are complete, valid params files that resolve the pipeline; the
scale-up ones build the models they promise, fit one 80 GB GPU, and state what they need."""

import hashlib
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from bench.profile_estimate import (
    GB,
    GPU_GB,
    Probe,
    default_classes,
    estimate,
    load_profile,
    tokenizer_step,
    world_size,
)
from tests.project import copy_project, run
from up.core.params import load_params
from up.data.sources import read_class_file
from up.models.transformer import VAR
from up.training.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))
RUN_MAPS = ("variants", "derived")
GPU_PROFILES = [p for p in PROFILES if not p.stem.startswith("overconfident")]  # CPU studies
PARAMS_FILES = [*PROFILES, ROOT / "params.yaml"]


def _load(profile: Path, tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(profile.read_text())
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return load_params()


def _key_paths(params: dict) -> set[str]:
    """Every key to one level inside each section (data.image_size): what a complete params
    file spells out. The run maps (variants, derived) name a profile's own runs: their
    options are checked per loss below."""
    paths = set()
    for key, value in params.items():
        paths.add(key)
        if key not in RUN_MAPS and isinstance(value, dict):
            paths.update(f"{key}.{sub}" for sub in value)
    return paths


def _runs(params: dict) -> dict[str, dict]:
    return {f"{group}.{name}": run for group in RUN_MAPS for name, run in params[group].items()}


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_profile_has_every_key_of_params_yaml(profile):
    """A profile replaces params.yaml whole: a key added to params.yaml (dvc.yaml may name
    it) must be added to every profile too, with the value that suits it; and each of its
    runs spells every option params.yaml spells for that loss (nothing left to a default)."""
    spelled = yaml.safe_load((ROOT / "params.yaml").read_text())
    given = yaml.safe_load(profile.read_text())
    missing = _key_paths(spelled) - _key_paths(given)
    assert not missing, f"{profile.name} lacks {sorted(missing)} (present in params.yaml)"
    options = {}
    for entry in _runs(spelled).values():
        options.setdefault(entry["loss"], set(entry))
    unspelled = [f"{where}: {sorted(options.get(e['loss'], set()) - set(e))}"
                 for where, e in _runs(given).items() if options.get(e["loss"], set()) - set(e)]
    assert not unspelled, f"{profile.name}: runs without options params.yaml spells: {unspelled}"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """One copy of the project in a temp git repo; each test writes its params.yaml."""
    return copy_project(tmp_path_factory.mktemp("profiles") / "project")


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_profile_resolves_the_pipeline(profile, project, monkeypatch):
    """The profile as params.yaml validates, and `dvc stage list` resolves dvc.yaml with
    it: ${launcher}, ${teacher} and the matrices over variants, derived and seeds (about
    2 s each)."""
    text = profile.read_text()
    (project / "params.yaml").write_text(text)
    monkeypatch.setenv("DVC_ROOT", str(project))
    load_params()
    listed = run(["dvc", "stage", "list", "--name-only"], project).stdout.split()
    params = yaml.safe_load(text)
    for stage, group in (("train", "variants"), ("train_derived", "derived")):
        expected = {f"{stage}@{v}-{s}" for v in params[group] for s in params["seeds"]}
        assert expected and {n for n in listed if n.startswith(f"{stage}@")} == expected, stage
    assert {n for n in listed if n.startswith("reference@")} == {f"reference@{s}"
                                                                 for s in params["seeds"]}
    assert {"prepare", "tokenizer", "report"} <= set(listed)


@pytest.mark.parametrize("profile", GPU_PROFILES, ids=[p.stem for p in GPU_PROFILES])
def test_gpu_profile_validates(profile, tmp_path, monkeypatch):
    params = _load(profile, tmp_path, monkeypatch)
    assert params.device == "cuda"
    assert {"ce", "ls", "lr", "up"} <= set(params.variants)


def test_overconfident_profile_is_the_study(tmp_path, monkeypatch):
    """The study's profile: every reference and baseline, 3 seeds, one thread, the
    small-data regime, and the default run's data/tokenizer/evaluator settings (so
    DVC reuses them)."""
    profile = PROFILES[0].with_name("overconfident.yaml")
    params = _load(profile, tmp_path, monkeypatch)
    default = _load(profile.parents[1] / "params.yaml", tmp_path, monkeypatch)
    assert params.seeds == [0, 1, 2] and params.threads == 1
    assert params.train.images_per_class == 50 and params.train.calib_fraction > 0
    refs = {getattr(v, "reference", None) for v in params.runs.values()}
    assert {"calibrated", "teacher", "empirical"} <= refs
    assert {"ce", "ls", "lr", "ce+ts"} <= set(params.runs)
    for section in ("data", "tokenizer", "evaluator"):
        assert getattr(params, section) == getattr(default, section), section


def test_confirmatory_runs_are_the_dose_response_runs(tmp_path, monkeypatch):
    """Part 2 of the study keeps part 1's runs of the same name and seed (their folders are
    skipped), which is right only if they are the same runs: every setting that defines a
    training run, and every sampling, sweep, editing and evaluation setting, agree. Part 2
    holds each `up` reference at one weight with its `+ts`, 5 seeds; part 1 has both
    ablations at that weight."""
    from up.training.run import resolved_params

    folder = PROFILES[0].parent
    dose = _load(folder / "overconfident-dose.yaml", tmp_path, monkeypatch)
    confirm = _load(folder / "overconfident-confirm.yaml", tmp_path, monkeypatch)
    assert confirm.seeds == [0, 1, 2, 3, 4] and set(dose.seeds) <= set(confirm.seeds)
    shared = sorted(set(dose.runs) & set(confirm.runs))
    assert {"ce", "ce+ts", "ce+ts-sampler"} <= set(shared) and len(shared) >= 7
    for name in shared:
        for seed in dose.seeds:
            assert resolved_params(dose, name, seed) == resolved_params(confirm, name, seed), name
    for section in ("seed", "data", "tokenizer", "transformer", "train", "reference", "sample",
                    "sweep", "edit", "evaluator", "evaluate"):
        assert getattr(dose, section) == getattr(confirm, section), section
    selected = {v.reference: v for n, v in confirm.runs.items()
                if v.loss == "up" and not n.endswith("+ts")}
    assert set(selected) == {"empirical", "calibrated", "teacher"}
    assert {f"{n}+ts" for n, v in confirm.runs.items() if v in selected.values()} <= set(confirm.runs)
    for ref, chosen in selected.items():
        ablations = {(v.lambda_disp, v.lambda_se) for v in dose.runs.values()
                     if v.loss == "up" and v.reference == ref}
        assert (chosen.lambda_disp, 0.0) in ablations and (0.0, chosen.lambda_se) in ablations, ref
    assert {"ls", "lr"} <= set(confirm.runs) and any(v.loss == "kd" for v in confirm.runs.values())


def test_imagenet_profile_is_var_d16(tmp_path, monkeypatch):
    params = _load(Path(PROFILES[0]).with_name("imagenet256-d16.yaml"), tmp_path, monkeypatch)
    tok, arch = params.tokenizer, params.transformer
    assert tok.patch_nums == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16] and tok.vocab_size == 4096
    assert params.data.image_size // tok.downsample == tok.patch_nums[-1]
    with torch.device("meta"):
        model = VAR(tok.vocab_size, tok.latent_channels, tok.patch_nums, num_classes=1000,
                    depth=arch.depth, width=arch.width, heads=arch.heads,
                    mlp_ratio=arch.mlp_ratio, drop_path=arch.drop_path, qk_norm=arch.qk_norm)
    assert abs(model.num_parameters() / 310e6 - 1) < 0.02  # VAR-d16's published size


@pytest.fixture(scope="module")
def estimates():
    """Each params file estimated once (about a second each on fake tensors)."""
    cache = {}

    def get(path: Path):
        if path not in cache:
            params = load_profile(path)
            with pytest.MonkeyPatch.context() as mp:  # a data.classes file: from the project root
                mp.chdir(ROOT)
                mp.delenv("DVC_ROOT", raising=False)
                cache[path] = params, estimate(params)[0]
        return cache[path]

    return get


@pytest.mark.parametrize("path", PARAMS_FILES, ids=[p.stem for p in PARAMS_FILES])
def test_every_stage_fits_one_80gb_gpu(path, estimates):
    """Tokenizer (at tokenizer.micro_batch), every variant's training step and sampling,
    built on the meta device: activations + weights/optimiser per GPU under 80 GB."""
    params, rows = estimates(path)
    trained = [v for v in params.runs.values() if v.loss != "ts"]
    swept = ["sweep"] * (1 + bool(params.sweep.temperature_variants and params.sweep.temperatures))
    assert [r.component.split(" ")[0] for r in rows] == \
        ["tokenizer"] + ["train"] * len(trained) + ["sample", *swept]
    for row in rows:
        assert 0 < row.total < GPU_GB * GB, f"{path.name}: {row.component} {row.total / GB:.1f} GB"
        assert row.fwd_flops > 0


def test_estimator_by_hand():
    """nn.Linear(1000, 1000) at batch 10: autograd keeps the input (10 x 1000 fp32) for
    the weight's gradient, once however many views of it are used; the matmul is
    2 x 10 x 1000 x 1000 FLOPs per call."""
    with torch.device("meta"):
        layer = nn.Linear(1000, 1000)
        x = torch.empty(10, 1000)
    with Probe(exclude=layer.parameters()) as probe:
        layer(x)
    assert probe.bytes == 10 * 1000 * 4
    assert probe.flops == 2 * 10 * 1000 * 1000
    with Probe(exclude=layer.parameters()) as probe:
        layer(x)
        layer(x[:5])  # a view: the same storage
    assert probe.bytes == 10 * 1000 * 4
    assert probe.flops == 2 * 15 * 1000 * 1000


def test_fake_estimate_equals_a_real_step(estimates):
    """The fake-tensor bookkeeping against the real thing: params.yaml's tokenizer step
    on real CPU tensors saves exactly the bytes and runs the FLOPs estimated, and its
    backward costs about twice the forward (the 3 x of the hours)."""
    params, rows = estimates(ROOT / "params.yaml")
    size = params.data.image_size
    model = build_tokenizer(params.tokenizer, params.data.channels).train()
    x = torch.rand(rows[0].micro_batch, params.data.channels, size, size) * 2 - 1
    with Probe(exclude=model.parameters()) as forward:
        loss = tokenizer_step(model, params.tokenizer, x, forward)
    with Probe() as backward:
        loss.backward()
    assert forward.bytes == rows[0].activations
    assert forward.flops == rows[0].fwd_flops * rows[0].micro_batch
    assert backward.flops / forward.flops == pytest.approx(2.0, rel=0.1)


@pytest.mark.parametrize("launcher, world", [
    ("up", 1),
    ("torchrun --nproc_per_node=8 -m stages.cli", 8),
    ("torchrun --nnodes 2 --nproc-per-node 4 -m stages.cli", 8),
])
def test_world_size_from_launcher(launcher, world):
    assert world_size(launcher) == world


def test_world_size_needs_numbers():
    with pytest.raises(ValueError, match="nproc_per_node"):
        world_size("torchrun --nproc_per_node=gpu -m stages.cli")


def test_imagenet_tokenizer_batch_is_split_into_micro_batches(estimates):
    """256 images over 8 GPUs is 32 per GPU; the profile's micro-batch takes 16 at a time."""
    params, rows = estimates(ROOT / "profiles/imagenet256-d16.yaml")
    assert world_size(params.launcher) == 8
    assert params.tokenizer.micro_batch == 16 and rows[0].micro_batch == 16
    assert rows[1].micro_batch == params.train.batch_size // 8


def _stated(header: str, component: str) -> list[str]:
    line = next(line for line in header.splitlines() if line.startswith(f"#   {component}  "))
    return re.split(r"\s{2,}", line[4:].strip())


# Profiles whose header states the estimate (the others may, and are then checked too).
ESTIMATED = ("imagenet256-d16", "imagenet100-var-d16-finetune", "afhq256-var-d16-finetune")
STATING = sorted({p for p in PROFILES if p.stem in ESTIMATED
                  or "python bench/profile_estimate.py" in p.read_text().split("\nseed:")[0]})


@pytest.mark.parametrize("path", STATING, ids=[p.stem for p in STATING])
def test_profile_states_its_estimate(path, estimates):
    """The header's table is what the script prints for the profile as it is now (to 5 %):
    change a size, a batch or the classes and the stated memory and hours must be regenerated."""
    header = path.read_text().split("\nseed:")[0]
    assert f"python bench/profile_estimate.py profiles/{path.name}" in header
    params, rows = estimates(path)
    assert f"#   world {world_size(params.launcher)} ({params.launcher}); " \
           f"{default_classes(params)} classes;" in header
    for row in rows:
        cells = _stated(header, row.component)
        assert int(cells[2]) == row.micro_batch, row.component
        assert float(cells[5]) == pytest.approx(row.total / GB, rel=0.05, abs=0.1), row.component
        assert float(cells[7]) == pytest.approx(row.hours, rel=0.05, abs=1e-6), row.component


# sha256 of https://github.com/HobbitLong/CMC/blob/master/imagenet100.txt (commit bc687a2):
# 100 WordNet IDs, one a line, each ended by a newline.
CMC_IMAGENET100_SHA256 = "79f3f1552ccc478ce24bd934b4573625db584ddc1f4643ae23c994a94cb11397"


def test_imagenet100_is_cmc_list(tmp_path, monkeypatch):
    """profiles/imagenet100.txt is CMC's ImageNet-100 list (its # lines aside), and the
    profile selects it, its 100 classes, from ImageNet-1k's folders."""
    text = (ROOT / "profiles/imagenet100.txt").read_text()
    ids = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(ids) == len(set(ids)) == 100 and all(re.fullmatch(r"n\d{8}", i) for i in ids)
    assert hashlib.sha256("".join(f"{i}\n" for i in ids).encode()).hexdigest() == \
        CMC_IMAGENET100_SHA256
    monkeypatch.chdir(ROOT)
    assert read_class_file("profiles/imagenet100.txt") == ids
    params = _load(ROOT / "profiles/imagenet100-var-d16-finetune.yaml", tmp_path, monkeypatch)
    assert params.data.classes == "profiles/imagenet100.txt" and params.data.image_size == 256


def test_paper_profiles_fine_tune_var_d16_untruncated(tmp_path, monkeypatch):
    """The paper's settings: VAR-d16 from the released weights, 256 px, every variant plus
    the derived ce+ts and ce+ts-sampler, sampled untruncated (the truncated pass is an
    experiment: header)."""
    for name in ("imagenet100-var-d16-finetune", "afhq256-var-d16-finetune"):
        path = ROOT / f"profiles/{name}.yaml"
        params = _load(path, tmp_path, monkeypatch)
        assert params.data.source == "imagefolder" and params.data.image_size == 256
        assert params.tokenizer.init_from and params.train.init_from
        assert (params.transformer.depth, params.transformer.width) == (16, 1024)
        assert set(params.variants) == {"ce", "ls", "lr", "up"}
        assert set(params.derived) == {"ce+ts", "ce+ts-sampler"}
        assert (params.sample.top_k, params.sample.top_p) == (0, 1.0)
        assert "-S sample.top_k=900 -S sample.top_p=0.95" in path.read_text().split("\nseed:")[0]
    afhq = _load(ROOT / "profiles/afhq256-var-d16-finetune.yaml", tmp_path, monkeypatch)
    assert afhq.data.classes == ["cat", "dog", "wild"]
