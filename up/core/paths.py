"""Where every stage reads and writes: the one place for file names (dvc.yaml
spells the same paths for DVC)."""

from __future__ import annotations

from pathlib import Path

PREPARED = Path("data/prepared")
TOKENS = Path("data/tokens")
TOKENIZER = Path("models/tokenizer.pt")
EVALUATOR = Path("models/evaluator.pt")
CHECKPOINTS = Path("checkpoints")
RESULTS = Path("results")


def run_tag(variant: str, seed: int) -> str:
    """The name of one variant's run with one training seed: ``ce-s0``."""
    return f"{variant}-s{seed}"


def model(variant: str, seed: int) -> Path:
    return Path("models") / f"var-{run_tag(variant, seed)}.pt"


def reference(seed: int) -> Path:
    """models/reference-s{seed}.pt: the empirical reference counted over the images that
    training seed ``seed`` trains on (reference@{seed})."""
    return Path("models") / f"reference-s{seed}.pt"


def samples(variant: str, seed: int) -> Path:
    return Path("samples") / run_tag(variant, seed)


def split(kind: str | Path, name: str) -> Path:
    """One split (train | val | test) of the prepared images (its row numbers) or of the
    token cache (its token rows): ``data/prepared/train.npy``, ``data/tokens/val.npy``."""
    return Path(kind) / f"{name}.npy"


def metrics(name: str) -> Path:
    """metrics/<name>.json: ``tokenizer``, ``train-ce-s0``, ``eval-ce-s0`` ..."""
    return Path("metrics") / f"{name}.json"


def sweep(variant: str, seed: int) -> Path:
    """metrics/sweep-{variant}-s{seed}.json, written by the sweep@ stage."""
    return metrics(f"sweep-{run_tag(variant, seed)}")


def eval_plots(variant: str, seed: int) -> Path:
    return Path("plots/eval") / run_tag(variant, seed)


def edits(variant: str, seed: int) -> Path:
    """edits/{variant}-s{seed}: the edit@ stage's grids, one per task (``edit_grid``);
    its measures go to metrics/edit-{variant}-s{seed}.json."""
    return Path("edits") / run_tag(variant, seed)


def edit_grid(task: str) -> str:
    """One edit task's grid under edits/<run>/: ``center.png``, ``right_half+class1.png``."""
    return f"{task}.png"


# results/<study>/runs/<run>/ (`up study`): one run's committed artifacts, copied from the
# pipeline's files above once the run finished, with the commit and machine it ran on
STUDY_TRAIN = "train.json"  # metrics/train-<run>.json
STUDY_CURVE = "curve.tsv"  # plots/train/<run>.tsv
STUDY_EVAL = "eval.json"  # metrics/eval-<run>.json
STUDY_EVAL_PLOTS = "eval"  # the JSON files of plots/eval/<run>/ (per-sample scores included)
STUDY_SWEEP = "sweep.json"  # metrics/sweep-<run>.json
STUDY_EDIT = "edit.json"  # metrics/edit-<run>.json
STUDY_PARAMS = "params.json"  # models/var-<run>.params.json
STUDY_PROVENANCE = "provenance.json"  # commit, CPU, threads, torch, start and end times
# results/<study>/ (`up report --study`): besides the report's files below, the weights the
# dose-response selected (up.evaluation.dose.select) and its figure
STUDY_SELECTION = "selection.json"
STUDY_DOSE_FIGURE = "dose_response.png"


def study(name: str) -> Path:
    """results/<name>: a study's report, frontier, figures and runs."""
    return RESULTS / name


def study_run(name: str, variant: str, seed: int) -> Path:
    """results/<name>/runs/<variant>-s<seed>: one run's artifacts."""
    return study(name) / "runs" / run_tag(variant, seed)


# results/ (report, frontier): the tables, their data, the headline figures that
# `dvc exp show` lists (metrics.json) and the figures
SUMMARY_MD = RESULTS / "summary.md"
SUMMARY_JSON = RESULTS / "summary.json"
HEADLINE_JSON = RESULTS / "metrics.json"
SAMPLES_FIGURE = RESULTS / "samples.png"
RELIABILITY_FIGURE = RESULTS / "reliability.png"
RISK_COVERAGE_FIGURE = RESULTS / "selective.png"
FRONTIER_MD = RESULTS / "frontier.md"
FRONTIER_JSON = RESULTS / "frontier.json"
FRONTIER_FIGURE = RESULTS / "frontier.png"
EDITING_FIGURE = RESULTS / "editing.png"  # the uncertainty map's use in editing (report)


# -- the files inside the folders above, and the stages' other files ----------------

TOKENIZER_CHECKPOINT = CHECKPOINTS / "tokenizer.pt"  # the tokenizer stage's resumable state
RECORD = "params.json"  # in data/prepared and samples/<run>: the settings its files came from

# data/prepared (prepare): every decoded image, their labels and class names, the files
# that could not be decoded, and per split its row numbers (``split``)
IMAGES = "images.npy"
LABELS = "labels.npy"
CLASSES = "classes.json"
SKIPPED = "skipped.json"
PREPARE_PREVIEW = Path("plots/prepare/preview.png")

# data/tokens (tokenize): per split its token rows (``split``) and labels, and the classes
# and scales of the cache
TOKEN_META = "meta.json"

# the tokenizer stage's curves and reconstruction grid
TOKENIZER_CURVES = Path("plots/tokenizer/curves.tsv")
TOKENIZER_GRID = Path("plots/tokenizer/grid.png")

# samples/<run> (sample@): the images and their uncertainty (written last), the class grid,
# the entropy figure, and on request one PNG per image under png/
SAMPLES_FILE = "samples.pt"
GRID = "grid.png"
UNCERTAINTY_MAP = "uncertainty_map.png"
SAMPLE_PNGS = "png"

# plots/eval/<run> (evaluate@): data as JSON, figures as PNG
RELIABILITY_JSON = "reliability.json"
SELECTIVE_JSON = "selective.json"
RISK_COVERAGE_JSON = "risk_coverage.json"
SELECTIVE_STATS_JSON = "selective_stats.json"
SCORE_CORRELATION_JSON = "score_correlation.json"
PER_SAMPLE_JSON = "per_sample.json"
RELIABILITY_PNG = "reliability.png"
SELECTIVE_PNG = "selective.png"
RISK_COVERAGE_PNG = "risk_coverage.png"
SCORE_CORRELATION_PNG = "score_correlation.png"

GENERATED = Path("generated.png")  # `up generate`'s grid unless --out says otherwise
EDITED = Path("edited")  # `up edit --image/--split`'s folder unless --out says otherwise
EDIT_UNCERTAINTY = "uncertainty.pt"  # in it: the fills' uncertainty maps and the mask
EXPORTED = Path("exported")  # `up export-var`'s VAR-format state dicts


def token_labels(root: str | Path, name: str) -> Path:
    """The labels of one token cache split: ``data/tokens/train-labels.npy``."""
    return Path(root) / f"{name}-labels.npy"


def checkpoint(variant: str, seed: int) -> Path:
    """checkpoints/var-{variant}-s{seed}.pt: train@'s resumable state (outside DVC's outputs)."""
    return CHECKPOINTS / f"var-{run_tag(variant, seed)}.pt"


def resolved_params(model_file: str | Path) -> Path:
    """The settings a model was made with, next to it: ``models/var-ce-s0.params.json``."""
    return Path(model_file).with_suffix(".params.json")


def train_curves(variant: str, seed: int) -> Path:
    """plots/train/{variant}-s{seed}.tsv: train@'s loss and learning-rate curves."""
    return Path("plots/train") / f"{run_tag(variant, seed)}.tsv"


def sample_png(index: int, label: int) -> str:
    """One image's PNG under samples/<run>/png/: ``00042_c3.png``."""
    return f"{index:05d}_c{label}.png"


def imported_var(depth: int) -> Path:
    """Where `up import-var` writes VAR's transformer unless --var-out says otherwise."""
    return Path("models") / f"var-d{depth}-imported.pt"


def exported_vae(base_width: int, vocab_size: int, latent_channels: int) -> Path:
    """VAR's own file name for a VQ-VAE of these sizes: ``exported/vae_ch160v4096z32.pth``."""
    return EXPORTED / f"vae_ch{base_width}v{vocab_size}z{latent_channels}.pth"


def exported_var(depth: int) -> Path:
    """VAR's own file name for a transformer of this depth: ``exported/var_d16.pth``."""
    return EXPORTED / f"var_d{depth}.pth"
