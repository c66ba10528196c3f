"""The `up` command: one sub-command per DVC stage, plus `study`, `generate` and the VAR interop.

Every stage command validates params.yaml before doing any work (exit 2 with
one line per bad key), then sets threads and seeds and runs the stage module.
A variant's loss settings are typed by its loss's declaration
(up/training/losses.py), which the train stage checks first, with the same exit
code and lines: checking them here would make every stage's code (and its DVC
deps) include the losses.
Heavy imports (torch) happen inside the commands so `up --help` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from up.core import paths

app = typer.Typer(
    help="Uncertainty-preserving visual autoregression: the pipeline's stage commands.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

Variant = Annotated[str, typer.Option(help="A run declared in params.yaml: under `variants` or "
                                       "`derived`, or `<name>+ts` for a `post_hoc` entry.")]
Seed = Annotated[int, typer.Option(help="Training seed (one of `seeds` in params.yaml).")]


def _fail(lines: list[str], code: int) -> None:
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    raise typer.Exit(code)


def _params(variant: str | None = None):
    from up.core.params import ParamsError, load_params

    try:
        params = load_params()
        if variant is not None:
            params.variant(variant)
    except ParamsError as exc:
        _fail(exc.lines, 2)
    return params


INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


def _offline_inception(params) -> list[str]:
    """The one line saying why evaluate.inception_weights cannot serve the offline
    inception-v3-compat extractor, if it cannot: torch-fidelity would otherwise try to
    download them, and fail offline only after the sampling."""
    ev = params.evaluate
    path = ev.inception_weights
    if ev.feature_extractor != "inception-v3-compat" or \
            (path is not None and os.path.isfile(path) and os.access(path, os.R_OK)):
        return []
    problem = "" if path is None else "not a readable file; "
    return [f"params.yaml: evaluate.inception_weights = {path!r}: {problem}inception-v3-compat runs "
            f"offline and needs a local weights file; get {INCEPTION_WEIGHTS} (torch-fidelity's "
            "release) and set its path"]


def _run(stage: str, seed: int | None = None, variant: str | None = None, features: bool = False,
         **kwargs) -> None:
    """Validate params, set up the process, run ``stages.<stage>.run``. ``features``: the
    stage's images are scored (now or by the evaluate stage after it), so the feature
    extractor must be usable offline before any work starts."""
    params = _params(variant)
    if features and (problems := _offline_inception(params)):
        _fail(problems, 2)
    from up.core.errors import StageError
    from up.core.params import ParamsError
    from up.core.runtime import setup

    setup(params.seed if seed is None else seed, params.threads)
    module = importlib.import_module(f"stages.{stage}")
    extra = {} if seed is None else {"seed": seed}
    if variant is not None:
        extra["variant"] = variant
    try:
        module.run(params, **extra, **kwargs)
    except ParamsError as exc:  # checked by the stage before its work (a loss's settings)
        _fail(exc.lines, 2)
    except (StageError, FileNotFoundError) as exc:
        _fail([f"{stage}: {exc}"], 1)


@app.command()
def prepare() -> None:
    """Read the data source, split train/val/test, store uint8 tensors."""
    _run("prepare")


@app.command()
def tokenizer() -> None:
    """Train the multi-scale VQ-VAE and cluster its codebook."""
    _run("tokenizer")


@app.command()
def tokenize() -> None:
    """Encode every split once into multi-scale token indices."""
    _run("tokenize")


@app.command()
def reference(seed: Seed = 0) -> None:
    """Count codes per context over one training seed's images: the empirical reference of `up`."""
    _run("reference", seed=seed)


@app.command()
def evaluator() -> None:
    """Train the feature network used for offline FID/KID/IS/PR."""
    _run("evaluator")


@app.command()
def train(variant: Variant, seed: Seed = 0) -> None:
    """Train the VAR transformer with the variant's loss (resumes automatically)."""
    _run("train", seed=seed, variant=variant)


@app.command()
def sample(variant: Variant, seed: Seed = 0) -> None:
    """Generate class-conditional images with per-token uncertainty."""
    _run("sample", seed=seed, variant=variant, features=True)


@app.command()
def evaluate(variant: Variant, seed: Seed = 0) -> None:
    """Quality, diversity, calibration and selective generation of one variant."""
    _run("evaluate", seed=seed, variant=variant, features=True)


@app.command()
def sweep(variant: Variant, seed: Seed = 0) -> None:
    """Sample and score one run over the guidance sweep (a quality-diversity curve)."""
    _run("sweep", seed=seed, variant=variant, features=True)


@app.command()
def edit(
    variant: Variant,
    seed: Seed = 0,
    image: Annotated[Path | None, typer.Option(
        help="Edit this image file (PNG/JPEG; fitted to the model's size as data.fit says) "
             "instead of running the edit@ stage.")] = None,
    split: Annotated[str | None, typer.Option(
        help="Edit the first --count images of this prepared split (train | val | test).")] = None,
    count: Annotated[int, typer.Option(help="Images of --split.")] = 8,
    mask: Annotated[str | None, typer.Option(
        help="center | left_half | right_half | top | bottom | 'box x0 y0 x1 y1' (pixels; "
             "default center).")] = None,
    mask_image: Annotated[Path | None, typer.Option(
        help="A mask image of the model's size: white = fill, black = keep.")] = None,
    label: Annotated[int | None, typer.Option(
        "--class", help="The requested class (required with --image; --split: each "
                        "image's own by default).")] = None,
    fills: Annotated[int | None, typer.Option(help="Fills per image (default: "
                                              "edit.fills_per_image).")] = None,
    out: Annotated[Path, typer.Option(help="Folder of the fills, maps and grid.")] = paths.EDITED,
    checkpoint: Annotated[Path | None, typer.Option(
        help="Another models/var-*.pt than the variant's (its kappa is the variant's).")] = None,
) -> None:
    """In-/out-painting and class editing with the fill's uncertainty map: the edit@ stage
    (metrics/edit-V-sS.json, edits/V-sS/), or with --image / --split one's own edits."""
    given = {"--count": count != 8, "--mask": mask is not None,
             "--mask-image": mask_image is not None, "--class": label is not None,
             "--fills": fills is not None, "--out": out != paths.EDITED,
             "--checkpoint": checkpoint is not None}
    if image is None and split is None:
        stray = [name for name, set_ in given.items() if set_]
        if stray:
            _fail([f"{', '.join(stray)}: only with --image FILE or --split NAME"], 2)
        _run("edit", seed=seed, variant=variant)
        return
    _run("edit", seed=seed, variant=variant, image=image, split=split, count=count, mask=mask,
         mask_image=mask_image, label=label, fills=fills, out=out, checkpoint=checkpoint)


Study = Annotated[str | None, typer.Option(
    help="Read the runs of results/<study>/runs/ (whichever are there) and write into "
         "results/<study>/, instead of the pipeline's files.")]


@app.command()
def frontier(study: Study = None) -> None:
    """Every variant compared at matched quality along its guidance curve."""
    _run("frontier", study=study)


@app.command()
def report(
    study: Study = None,
    readme: Annotated[Path | None, typer.Option(
        help="Then rewrite this README's <!-- study:NAME:PART --> ... <!-- /study --> blocks "
             "from results/NAME/PART.md.")] = None,
) -> None:
    """One comparison table and figures over all variants and seeds."""
    _run("report", study=study, readme=readme)


@app.command()
def study(
    name: Annotated[str, typer.Argument(help="The study's folder: results/<name>/.")],
    profile: Annotated[Path, typer.Option(help="The study's profile (params.yaml must equal it).")],
    lanes: Annotated[int, typer.Option(help="Runs side by side, each with params' threads.")] = 2,
    only: Annotated[list[str] | None, typer.Option(
        help="Only the runs whose tag (variant-s<seed>) matches this pattern (fnmatch, "
             "repeatable), and the runs they build on.")] = None,
) -> None:
    """Run every (variant, seed) of a profile in lanes; keep each run under results/<name>/runs/."""
    _run("study", name=name, profile=profile, lanes=lanes, only=only)


@app.command()
def generate(
    checkpoint: Annotated[Path, typer.Option(help="A models/var-*.pt file.")],
    out: Annotated[Path, typer.Option(help="Output PNG grid.")] = paths.GENERATED,
    tokenizer_path: Annotated[Path, typer.Option("--tokenizer")] = paths.TOKENIZER,
    classes: Annotated[str, typer.Option(help="Comma-separated class ids.")] = "0,1,2,3,4,5,6,7,8,9",
    n: Annotated[int, typer.Option(help="Images per class.")] = 8,
    seed: int = 0,
    guidance: Annotated[float | None, typer.Option(help="Default: sample.guidance.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Default: sample.top_k.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Default: sample.top_p.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Default: sample.temperature.")] = None,
) -> None:
    """Write a sample grid from any variant's checkpoint, outside the pipeline."""
    try:
        class_ids = [int(c) for c in classes.split(",") if c.strip()]
    except ValueError:
        _fail([f"--classes {classes!r}: expected comma-separated integers"], 2)
    _run("generate", seed=seed, checkpoint=checkpoint, tokenizer=tokenizer_path,
         classes=class_ids, n=n, guidance=guidance, top_k=top_k, top_p=top_p, temperature=temperature,
         out=out)


@app.command("import-var")
def import_var(
    vae: Annotated[Path | None, typer.Option(help="VAR's VQ-VAE, e.g. vae_ch160v4096z32.pth.")] = None,
    var: Annotated[Path | None, typer.Option(help="VAR's transformer, e.g. var_d16.pth.")] = None,
    tokenizer_out: Annotated[Path, typer.Option(help="Our tokenizer checkpoint to write.")
                             ] = paths.TOKENIZER,
    var_out: Annotated[Path | None, typer.Option(help="Our transformer checkpoint to write "
                                                 "(default: models/var-d<depth>-imported.pt).")] = None,
    clusters: Annotated[int | None, typer.Option(help="Codebook clusters for semantic entropy "
                                                 "(default: tokenizer.semantic_clusters).")] = None,
    class_rows: Annotated[str | None, typer.Option(
        help="Keep only these classes of --var's class embedding (plus the null row), label i = "
             "the i-th: comma-separated class indices (e.g. 3,1) or a file of one a line (# "
             "comments); with --imagenet-root, class folder names (WordNet IDs) instead. "
             "Default --var-out: models/var-d<depth>-imported-<n>classes.pt.")] = None,
    imagenet_root: Annotated[Path | None, typer.Option(
        help="ImageNet's train folder: its sorted sub-folders number the classes that "
             "--class-rows names (labels then follow that sorted order).")] = None,
) -> None:
    """Import VAR's released VQ-VAE and/or transformer (sizes inferred, every key checked)."""
    _run("interop", action="import", vae=vae, var=var, tokenizer_out=tokenizer_out,
         var_out=var_out, clusters=clusters, class_rows=class_rows, imagenet_root=imagenet_root)


@app.command("export-var")
def export_var(
    tokenizer_path: Annotated[Path | None, typer.Option("--tokenizer", help="Our tokenizer (arch var).")
                              ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Our models/var-*.pt checkpoint.")] = None,
    vae_out: Annotated[Path | None, typer.Option(
        help="VAR-format VQ-VAE to write (default: exported/vae_ch<W>v<V>z<C>.pth).")] = None,
    var_out: Annotated[Path | None, typer.Option(
        help="VAR-format transformer to write (default: exported/var_d<depth>.pth).")] = None,
    ema: Annotated[bool, typer.Option(help="Export the EMA weights when the checkpoint has them.")] = True,
) -> None:
    """Write state dicts that VAR's own code loads (strict) from our tokenizer and/or transformer."""
    _run("interop", action="export", tokenizer=tokenizer_path, checkpoint=checkpoint,
         vae_out=vae_out, var_out=var_out, ema=ema)


if __name__ == "__main__":
    app()
