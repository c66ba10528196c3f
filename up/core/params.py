"""Validated parameters: params.yaml -> typed settings, one section per stage.

params.yaml is the single source of every setting that changes a result. It is
loaded into pydantic-settings models so that a typo or an out-of-range value
stops a stage before it does any work (and never half-writes an output). This
file holds types, ranges and documentation only: every key is required, so
params.yaml and every profile spell them all, and no value hides here (the loss
settings' defaults, in up/training/losses.py, equal params.yaml's: both checked
by tests/test_config.py).
Environment variables override single keys (``UP_TRAIN__LR=1e-3``); they bypass
DVC's params tracking, so use them for quick local trials only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

PARAMS_FILE = "params.yaml"


class Section(BaseModel):
    """A params.yaml section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    source: Literal["mnist5k", "digits", "mnist", "fashion-mnist", "cifar10", "imagefolder"]
    root: str
    download: bool
    channels: Literal[1, 3]
    image_size: int = Field(ge=8, le=1024)
    fit: Literal["pad", "resize"]
    val_fraction: float = Field(gt=0, lt=0.5)
    test_fraction: float = Field(gt=0, lt=0.5)
    preview_per_class: int = Field(ge=1, le=64)
    preview_classes: int = Field(ge=1, le=100)  # preview rows: at most this many classes
    workers: int = Field(ge=1, le=256)  # image decode processes (imagefolder); no effect on outputs
    # A subset of the source's classes (any source; up/data/sources.py `select_classes`):
    # null = all; a count = that many drawn with `seed`; a list of class names; or the path
    # (relative to the project root) of a file of names, one a line. Labels keep the source's
    # class order; data/prepared/classes.json records the classes used.
    classes: int | list[str] | str | None

    @field_validator("classes", mode="before")
    @classmethod
    def _class_selection(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("give null, a count, a list of class names or a file path")
        if isinstance(value, list):  # numeric class names (mnist's 0..9) as written in YAML
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        return value

    @field_validator("classes", mode="after")
    @classmethod
    def _classes_valid(cls, selection: int | list[str] | str | None) -> int | list[str] | str | None:
        if isinstance(selection, int) and selection < 2:
            raise ValueError("select at least 2 classes")
        if isinstance(selection, list):
            if len(selection) < 2:
                raise ValueError("select at least 2 classes")
            blank = [name for name in selection if not name.strip()]
            if blank:
                raise ValueError(f"blank class name {blank[0]!r}")
            repeated = sorted({name for name in selection if selection.count(name) > 1})
            if repeated:
                raise ValueError(f"{repeated} listed more than once")
        if isinstance(selection, str) and not selection.strip():
            raise ValueError("empty file path (null selects every class)")
        return selection


class TokenizerParams(Section):
    arch: Literal["conv", "var"]  # conv: small images; var: VAR's VQ-VAE net
    init_from: str | None  # use this tokenizer checkpoint (e.g. imported) instead of training
    downsample: Literal[2, 4, 8, 16]
    widths: list[Annotated[int, Field(ge=4)]]  # conv: width per stride-2 level
    base_width: int = Field(ge=32, multiple_of=32)  # var: base channels
    ch_mult: list[Annotated[int, Field(ge=1)]]  # var: multiplier per level
    res_blocks: int = Field(ge=0, le=8)
    latent_channels: int = Field(ge=1)
    vocab_size: int = Field(ge=2, le=65536)
    patch_nums: list[Annotated[int, Field(ge=1)]]
    phi_share: int = Field(ge=1)
    beta: float = Field(ge=0)
    partial_weight: float = Field(ge=0)
    reseed_every: int = Field(ge=0)
    reseed_until: float = Field(ge=0, le=1)
    reseed_threshold: float = Field(ge=0)
    semantic_clusters: int = Field(ge=1)
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup_steps: int = Field(ge=0)
    save_every: int = Field(ge=1)
    grid_images: int = Field(ge=1, le=64)
    augment: Literal["none", "flip", "crop_flip"]  # random flips / crops of training images
    micro_batch: int = Field(ge=0)  # images per process per forward (0 = its whole share)
    bf16: bool  # autocast on CUDA only

    @model_validator(mode="after")
    def _consistent(self) -> TokenizerParams:
        levels = int(math.log2(self.downsample))
        if self.arch == "var" and len(self.ch_mult) != levels + 1:
            raise ValueError(f"ch_mult has {len(self.ch_mult)} entries, downsample="
                             f"{self.downsample} needs {levels + 1} (arch var)")
        if self.arch == "conv" and len(self.widths) != levels:
            raise ValueError(
                f"widths has {len(self.widths)} entries, downsample={self.downsample} "
                f"needs {levels} (one per stride-2 level)"
            )
        if self.patch_nums != sorted(set(self.patch_nums)):
            raise ValueError(f"patch_nums {self.patch_nums} must be strictly increasing")
        if self.phi_share > len(self.patch_nums):
            raise ValueError(f"phi_share={self.phi_share} exceeds the {len(self.patch_nums)} scales")
        if self.semantic_clusters > self.vocab_size:
            raise ValueError(
                f"semantic_clusters={self.semantic_clusters} exceeds vocab_size={self.vocab_size}"
            )
        return self


class TokenizeParams(Section):
    batch_size: int = Field(ge=1)  # images encoded per forward; the tokens do not depend on it


class TransformerParams(Section):
    depth: int = Field(ge=1)
    width: int = Field(ge=8)
    heads: int = Field(ge=1)
    mlp_ratio: float = Field(gt=0)
    drop_path: float = Field(ge=0, lt=1)
    qk_norm: bool

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransformerParams:
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not divisible by heads={self.heads}")
        return self


class TrainParams(Section):
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    beta1: float = Field(ge=0, lt=1)
    beta2: float = Field(ge=0, lt=1)
    warmup_steps: int = Field(ge=0)
    schedule: Literal["cosine", "linear"]
    min_lr_ratio: float = Field(ge=0, le=1)
    grad_clip: float = Field(ge=0)
    cond_drop: float = Field(ge=0, lt=1)
    ema: float = Field(ge=0, lt=1)
    token_weighting: Literal["uniform", "per_scale"]
    save_every: int = Field(ge=1)
    log_every: int = Field(ge=1)
    bf16: bool
    compile: bool
    calib_fraction: float = Field(ge=0, lt=0.5)  # held out of every variant's training
    images_per_class: int = Field(ge=0)  # train on the first n of each class (0 = all)
    init_from: str | None  # start every variant from this models/var-*.pt (fine-tuning)
    calib_tokens: int = Field(ge=0)  # temperature fits: seeded token sample per scale (0 = all)


class Variant(BaseModel):
    """A variant as params.yaml writes it: `loss` names a loss declared in
    up/training/losses.py, the other keys are that loss's settings, kept as written.
    The params know no loss (core is the lowest wing): the loss's declaration types
    and checks them (``up.training.losses.variant_params``, which every training run
    calls before its work); read them typed from there, or raw with :meth:`option`."""

    model_config = ConfigDict(extra="allow", frozen=True)

    loss: str = Field(min_length=1)

    def option(self, key: str, default: Any = None) -> Any:
        """A loss setting as written in params.yaml (unchecked here), else ``default``."""
        return (self.model_extra or {}).get(key, default)


class ReferenceParams(Section):
    """The empirical reference: candidate contexts and Dirichlet prior masses a_0,
    the pair with the lowest held-out NLL is used."""

    contexts: list[Literal["scale", "parent", "scale_class", "parent_class"]]
    priors: list[Annotated[float, Field(gt=0)]]


class SampleParams(Section):
    n_per_class: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    guidance: float = Field(ge=0)
    guidance_schedule: Literal["linear", "constant"]
    top_k: int = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    temperature: float = Field(gt=0)
    draw: Literal["inverse_cdf", "multinomial"]  # how a token is drawn (up.generation.sampler)
    compile: bool  # torch.compile the blocks for sampling (up.generation.sampler.compile_for_sampling)
    unconditional: bool
    save_pngs: bool
    grid_per_class: int = Field(ge=1, le=64)
    grid_classes: int = Field(ge=1, le=100)  # grid rows: at most this many classes


class SweepParams(Section):
    """The sweep (sweep@ stages: one row per setting, on three axes) and the matched
    quality of the frontier stage."""

    guidance: list[Annotated[float, Field(ge=0)]] = Field(min_length=2)
    # the temperature axis: sampling temperatures at sample.guidance, for these runs only
    temperatures: list[Annotated[float, Field(gt=0)]]
    temperature_variants: list[str]
    # the truncation row: top-k of this fraction of the vocabulary and top-p, at sample.guidance
    truncation: bool
    top_k_fraction: float = Field(gt=0, le=1)
    top_p: float = Field(gt=0, le=1)
    n_per_class: int = Field(ge=1)
    # the quality level recall / diversity are read at; null = the midpoint of the range
    # every run's curve reaches (see up/evaluation/frontier.py)
    match_precision: float | None = Field(gt=0, le=1)
    match_class_accuracy: float | None = Field(gt=0, le=1)

    @model_validator(mode="after")
    def _distinct(self) -> SweepParams:
        for key in ("guidance", "temperatures", "temperature_variants"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"sweep.{key} has repeated values: {values}")
        return self


class EditParams(Section):
    """The edit@ stages: in-/out-painting and class editing of test images (the sample
    section's sampling settings; masks parsed by up.generation.editing.named_mask)."""

    masks: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    images_per_class: int = Field(ge=1)  # test images edited per class (seeded by `seed`)
    fills_per_image: int = Field(ge=2)  # the fills' disagreement and diversity need two
    class_shift: int = Field(ge=0)  # class editing: class (c + shift) mod C; 0 = off
    grid_rows: int = Field(ge=1, le=100)  # rows of each task's grid: one image per class

    @field_validator("masks")
    @classmethod
    def _distinct_masks(cls, masks: list[str]) -> list[str]:
        if len(set(masks)) != len(masks):
            raise ValueError(f"repeated masks: {masks}")
        return masks


class EvaluatorParams(Section):
    widths: list[Annotated[int, Field(ge=4)]]
    feature_dim: int = Field(ge=2)
    feature_scale: float = Field(gt=0)
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    warmup_steps: int = Field(ge=0)  # linear warm-up, at most steps // 10, then cosine decay
    eval_batch_size: int = Field(ge=1)  # images per forward: feature scale and accuracies


class EvaluateParams(Section):
    feature_extractor: Literal["evaluator", "inception-v3-compat"]
    inception_weights: str | None
    reference_stats: str | None  # .npz with mu, sigma of the real images (published FID)
    kid_subset_size: int = Field(ge=2)
    kid_subsets: int = Field(ge=1)
    is_splits: int = Field(ge=1)  # Inception Score splits, clamped to the number of samples
    feature_batch_size: int = Field(ge=1)  # images per pass of the evaluator and the FID network
    pr_neighborhood: int = Field(ge=1)
    ece_bins: int = Field(ge=2)
    selective_fractions: list[Annotated[float, Field(gt=0, le=1)]]
    random_repeats: int = Field(ge=1)
    realism_k: int = Field(ge=1)  # realism: k-th nearest real neighbour's radius
    # realism against at most this many training images per class (seeded; 0 = all)
    realism_per_class: int = Field(ge=0)
    realism_threshold: float = Field(gt=0)  # failed sample: realism below it (or misclassified)
    bootstrap: int = Field(ge=1)  # stratified bootstrap draws for the 95 % intervals


class Params(BaseSettings):
    """All of params.yaml. Stages use the sections they need."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix="UP_",
        env_nested_delimiter="__",
    )

    seed: int = Field(ge=0)
    launcher: str = Field(min_length=1)  # runs tokenizer/train/sample/evaluate: up | torchrun ...
    threads: int = Field(ge=1, le=512)
    device: Literal["auto", "cpu", "cuda"]
    seeds: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)
    data: DataParams
    tokenizer: TokenizerParams
    tokenize: TokenizeParams
    transformer: TransformerParams
    train: TrainParams
    variants: dict[str, Variant]
    teacher: str
    derived: dict[str, Variant]
    post_hoc: list[str]  # runs temperature-scaled post hoc: each gets a run `<name>+ts`
    reference: ReferenceParams
    sample: SampleParams
    sweep: SweepParams
    edit: EditParams
    evaluator: EvaluatorParams
    evaluate: EvaluateParams

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_source = YamlConfigSettingsSource(settings_cls, yaml_file=params_path())
        return init_settings, env_settings, yaml_source

    @model_validator(mode="after")
    def _variant_groups(self) -> Params:
        """`variants` train from the data; `derived` are built from the `teacher`
        model (post-hoc temperature scaling, or training against it), so DVC can
        order them after it. Which variant needs the teacher is its loss's to say
        (``needs_teacher`` of its declaration, checked by
        ``up.training.losses.check_variants``)."""
        if self.derived and self.teacher not in self.variants:
            raise ValueError(f"teacher={self.teacher!r} is not one of variants "
                             f"{sorted(self.variants)}")
        both = sorted(set(self.variants) & set(self.derived))
        if both:
            raise ValueError(f"{both} declared under both variants and derived")
        declared = {**self.variants, **self.derived}
        for name in self.post_hoc:
            if name not in declared or declared[name].loss == POST_HOC_LOSS:
                raise ValueError(f"post_hoc lists {name!r}: give a trained run of variants or "
                                 f"derived (not loss {POST_HOC_LOSS})")
        taken = sorted(set(self.post_hoc_runs) & set(declared))
        if taken or len(set(self.post_hoc)) != len(self.post_hoc):
            raise ValueError(f"post_hoc {self.post_hoc} repeats a name or makes runs "
                             f"{taken} that are declared already")
        bad = sorted(set(self.sweep.temperature_variants) - set(self.runs))
        if bad:
            raise ValueError(f"sweep.temperature_variants {bad} are not runs; runs: "
                             f"{sorted(self.runs)}")
        return self

    @property
    def post_hoc_runs(self) -> dict[str, Variant]:
        """The `<name>+ts` run of each `post_hoc` entry: temperatures fitted on the
        calibration slice over that run's model, a calibrator (its samples are the
        model's own; the loss's default settings)."""
        return {post_hoc_run(name): Variant(loss=POST_HOC_LOSS) for name in self.post_hoc}

    @property
    def runs(self) -> dict[str, Variant]:
        """Every evaluated variant: the trained ones, the derived ones, the post-hoc ones."""
        return {**self.variants, **self.derived, **self.post_hoc_runs}

    def base(self, name: str) -> str | None:
        """The run whose model run ``name`` is built from (DVC makes it first): the
        `teacher` for `derived` runs, ``<base>`` for a post-hoc ``<base>+ts``, None for
        runs trained from the data alone."""
        self.variant(name)  # ParamsError when not declared
        if name in self.derived:
            return self.teacher
        return next((base for base in self.post_hoc if post_hoc_run(base) == name), None)

    def variant(self, name: str) -> Variant:
        """The untyped section of a declared variant (typed: up.training.losses.variant_params)."""
        if name not in self.runs:
            raise ParamsError([f"variant {name!r} is not declared; declared: {sorted(self.runs)}"])
        return self.runs[name]


POST_HOC_LOSS = "ts"  # the loss of a post_hoc run: temperature scaling (up/training/losses.py)


def post_hoc_run(name: str) -> str:
    """The name of run ``name``'s post-hoc temperature-scaled run."""
    return f"{name}+{POST_HOC_LOSS}"


class ParamsError(Exception):
    """Invalid parameters; ``lines`` holds one human-readable line per problem."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def project_root() -> Path:
    """The project root: DVC_ROOT when DVC runs the stage, else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd())


def params_path() -> Path:
    return project_root() / PARAMS_FILE


def describe_error(error: dict) -> str:
    """One pydantic error as the line a stage prints: ``params.yaml: key = value: why``."""
    loc = list(error["loc"])
    key = ".".join(str(part) for part in loc) or "<root>"
    given = "missing" if error["type"] == "missing" else repr(error.get("input"))
    return f"{PARAMS_FILE}: {key} = {given}: {error['msg']}"


def load_params() -> Params:
    """Read and validate params.yaml (plus UP_* environment overrides).

    Raises ParamsError naming every bad key, its value and what is allowed.
    """
    path = params_path()
    if not path.is_file():
        raise ParamsError([f"{path}: not found (run from the project root or set DVC_ROOT)"])
    try:
        return Params()
    except ValidationError as exc:
        raise ParamsError([describe_error(err) for err in exc.errors()]) from None
