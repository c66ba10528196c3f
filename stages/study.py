"""`up study`: run a study's (variant, seed) runs in parallel lanes and keep each
run's artifacts under results/<study>/runs/<run>/, with the commit it ran at.

A study is a profile (a params file) run from a clean checkout: every run goes
through the stage commands DVC would call (train, sample, evaluate, sweep, edit), in
``lanes`` processes side by side (on a small CPU, two 1-thread lanes give the
throughput of one 2-thread run and suffer less from other load; DVC runs one
stage at a time). A derived run waits for its teacher's training of the same
seed, a post-hoc ``+ts`` run for its base's. When a run's commands have
finished, its files are copied into its folder at once (written aside, then
renamed), so a folder is either whole or absent: a study stopped at any point
resumes by running again, skipping the runs whose folder exists, and its
folders can be committed as they finish. The shared stages (prepare, tokenizer,
tokenize, evaluator) come from `dvc repro` first; the report and frontier read
the folders (`up report --study`, `up frontier --study`).
"""

from __future__ import annotations

import fnmatch
import json
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from up.core import paths
from up.core.errors import StageError
from up.core.io import atomic_dir, save_json, save_text
from up.core.params import PARAMS_FILE, Params
from up.core.runtime import cpu_model
from up.training.losses import declaration, variant_params
from up.training.run import resolved_params

# The stage commands of one run, in order (each one DVC's cmd for the run's stages).
COMMANDS = ("train", "sample", "evaluate", "sweep", "edit")
# Tracked files a study's checkout may have changed: the profile, and what DVC and the runs
# write (the default run's edit grids under edits/ are rewritten by a run of the same name).
DVC_WRITES = (PARAMS_FILE, "dvc.lock", "metrics/", "plots/", "edits/")


@dataclass
class Run:
    """One (variant, seed) of the study and the run whose model it needs first."""

    variant: str
    seed: int
    needs: str | None = None  # run tag of the teacher (derived) or base (post hoc)
    empirical: bool = False  # trains against the empirical reference of its seed
    trained: threading.Event = field(default_factory=threading.Event)

    @property
    def tag(self) -> str:
        return paths.run_tag(self.variant, self.seed)


def plan(params: Params) -> list[Run]:
    """Every run of the profile, seed after seed (a study stopped early has whole seeds);
    within a seed in profile order, the runs built on another run's model after it (a
    derived run after the teacher, a post-hoc run after its base)."""
    runs: list[Run] = []
    for seed in params.seeds:
        block = []
        for name in params.runs:
            spec = variant_params(params, name)
            base = params.base(name)
            needs = None if base is None else paths.run_tag(base, seed)
            block.append(Run(name, seed, needs,
                             declaration(spec.loss).reference(spec) == "empirical"))
        runs += sorted(block, key=lambda r: r.needs is not None)  # stable: profile order
    return runs


def select(runs: list[Run], only: list[str] | None) -> list[Run]:
    """The runs whose tag matches one of the ``only`` patterns (fnmatch; all when None),
    and the runs whose models they need: part of a study in one sitting."""
    if not only:
        return runs
    chosen = {r.tag for r in runs if any(fnmatch.fnmatchcase(r.tag, pattern) for pattern in only)}
    if not chosen:
        raise StageError(f"--only {' '.join(only)}: no run of the profile matches "
                         f"({', '.join(r.tag for r in runs[:6])}, ...)")
    by_tag = {r.tag: r for r in runs}
    for tag in list(chosen):
        while (needs := by_tag[tag].needs) is not None and needs not in chosen:
            chosen.add(needs)
            tag = needs
    return [r for r in runs if r.tag in chosen]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def check_checkout(profile: Path) -> str:
    """The commit of a clean checkout whose params.yaml is ``profile``; else StageError."""
    if Path(PARAMS_FILE).read_bytes() != profile.read_bytes():
        raise StageError(f"{PARAMS_FILE} is not {profile}: `cp {profile} {PARAMS_FILE}` first "
                         "(every stage command reads params.yaml)")
    # Porcelain lines are "XY path" (the status columns may start with a space). What
    # `dvc repro` of the shared stages writes (the lock, metrics, plots) may differ.
    changed = [path for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
               if not (path := line[3:]).startswith(DVC_WRITES)]
    if changed:
        raise StageError(f"the checkout has uncommitted changes ({', '.join(changed[:5])}): a study "
                         "runs on a commit, so that every run can be repeated from it")
    return git("rev-parse", "HEAD").strip()


def collect(study: str, run: Run, provenance: dict) -> Path:
    """Copy the run's files into results/<study>/runs/<run>/ at once (a rename)."""
    v, s = run.variant, run.seed
    files = {paths.STUDY_TRAIN: paths.metrics(f"train-{run.tag}"),
             paths.STUDY_CURVE: paths.train_curves(v, s),
             paths.STUDY_EVAL: paths.metrics(f"eval-{run.tag}"),
             paths.STUDY_SWEEP: paths.sweep(v, s),
             paths.STUDY_EDIT: paths.metrics(f"edit-{run.tag}"),
             paths.STUDY_PARAMS: paths.resolved_params(paths.model(v, s))}
    missing = [str(src) for src in files.values() if not src.is_file()]
    if missing:
        raise StageError(f"run {run.tag} finished without {', '.join(missing)}")
    target = paths.study_run(study, v, s)
    with atomic_dir(target) as tmp:
        for name, src in files.items():
            shutil.copyfile(src, tmp / name)
        (tmp / paths.STUDY_EVAL_PLOTS).mkdir()
        for src in sorted(paths.eval_plots(v, s).glob("*.json")):
            shutil.copyfile(src, tmp / paths.STUDY_EVAL_PLOTS / src.name)
        save_json(provenance, tmp / paths.STUDY_PROVENANCE)
    return target


class Study:
    """The scheduler: ``lanes`` runs at a time, each a chain of stage commands."""

    def __init__(self, name: str, profile: Path, commit: str, params: Params, lanes: int,
                 logs: Path, only: list[str] | None = None):
        self.name, self.profile, self.commit, self.params = name, profile, commit, params
        self.lanes, self.logs = lanes, logs
        self.runs = {run.tag: run for run in select(plan(params), only)}
        self.lock = threading.Lock()  # the reference of a seed is counted once

    def done(self, run: Run) -> bool:
        return (paths.study_run(self.name, run.variant, run.seed) / paths.STUDY_PROVENANCE).is_file()

    def command(self, run: Run, stage: str, *args: str) -> float:
        """Run one `up` command (its output appended to the run's log); its wall seconds."""
        log = self.logs / f"{run.tag}.log"
        start = time.perf_counter()
        with log.open("a") as out:
            out.write(f"$ up {stage} {' '.join(args)}\n")
            out.flush()
            code = subprocess.run([sys.executable, "-m", "stages.cli", stage, *args],
                                  stdout=out, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise StageError(f"run {run.tag}: `up {stage} {' '.join(args)}` failed "
                             f"(exit {code}); see {log}")
        return time.perf_counter() - start

    def trained_here(self, run: Run) -> bool:
        """Whether the workspace holds the run's model made with these params (a model
        left by another profile or an earlier commit's params is trained again)."""
        model = paths.model(run.variant, run.seed)
        record = paths.resolved_params(model)
        if not (model.is_file() and record.is_file()):
            return False
        wanted = json.loads(json.dumps(resolved_params(self.params, run.variant, run.seed)))
        return json.loads(record.read_text()) == wanted

    def train_model(self, run: Run) -> dict[str, float]:
        """The run's model (and its seed's empirical reference first, when it needs it)."""
        seconds: dict[str, float] = {}
        if run.needs is not None:
            self.runs[run.needs].trained.wait()
        if run.empirical:
            with self.lock:
                if not paths.reference(run.seed).is_file():
                    seconds["reference"] = self.command(run, "reference", "--seed", str(run.seed))
        if not self.trained_here(run):
            seconds["train"] = self.command(run, "train", "--variant", run.variant,
                                            "--seed", str(run.seed))
        return seconds

    def execute(self, run: Run) -> str:
        """Train (always, when another run needs the model), then, unless the run's folder
        exists, sample, evaluate, sweep and collect."""
        try:
            needed = any(other.needs == run.tag and not self.done(other)
                         for other in self.runs.values())
            if self.done(run) and not needed:
                return f"{run.tag}: already in {paths.study_run(self.name, run.variant, run.seed)}"
            started = datetime.now(UTC).isoformat(timespec="seconds")
            seconds = self.train_model(run)
        finally:
            run.trained.set()  # a failed teacher releases its runs (they fail on its missing model)
        if self.done(run):
            return f"{run.tag}: model trained for the runs that need it"
        for stage in COMMANDS[1:]:
            seconds[stage] = self.command(run, stage, "--variant", run.variant,
                                          "--seed", str(run.seed))
        target = collect(self.name, run, {
            "commit": self.commit, "profile": str(self.profile), "variant": run.variant,
            "seed": run.seed, "cpu": cpu_model(), "threads": self.params.threads,
            "lanes": self.lanes, "torch": _torch_version(), "python": platform.python_version(),
            "started": started, "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": {k: round(v, 1) for k, v in seconds.items()}})
        return f"{run.tag}: done in {sum(seconds.values()) / 60:.1f} min -> {target}"

    def run(self) -> list[str]:
        """Every run, ``lanes`` at a time; the failures, one line each."""
        self.logs.mkdir(parents=True, exist_ok=True)
        study_dir = paths.study(self.name)
        study_dir.joinpath("profiles").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.profile, study_dir / "profiles" / self.profile.name)
        failures = []
        with ThreadPoolExecutor(self.lanes) as pool:
            # FIFO: a run waits only for runs submitted before it, which have started
            futures: list[Future] = [pool.submit(self.execute, run) for run in self.runs.values()]
            for future in futures:
                try:
                    print(future.result(), flush=True)
                except StageError as exc:
                    failures.append(str(exc))
                    print(f"error: {exc}", file=sys.stderr, flush=True)
        return failures


def _torch_version() -> str:
    import torch

    return torch.__version__


def run(params: Params, name: str, profile: Path, lanes: int, only: list[str] | None = None
        ) -> None:
    """Run the study ``name`` of ``profile`` (which params.yaml must equal); with ``only``,
    the runs matching those patterns (and the runs they build on)."""
    if lanes < 1:
        raise StageError(f"--lanes {lanes}: at least 1")
    if not profile.is_file():
        raise StageError(f"profile {profile} not found")
    commit = check_checkout(profile)
    for shared in (paths.PREPARED, paths.TOKENS, paths.TOKENIZER, paths.EVALUATOR):
        if not shared.exists():
            raise StageError(f"{shared} is missing: `dvc repro prepare tokenizer tokenize "
                             "evaluator` first (the study's runs share them)")
    study = Study(name, profile, commit, params, lanes, Path("logs") / "study" / name, only)
    print(f"study {name}: {len(study.runs)} runs of {profile} at {commit[:7]}, {lanes} lanes "
          f"({cpu_model()}, {params.threads} thread(s) each); logs in {study.logs}", flush=True)
    failures = study.run()
    save_text(json.dumps({"commit": commit, "profile": str(profile), "failures": failures},
                         indent=2) + "\n", study.logs / "last.json")
    if failures:
        raise StageError(f"{len(failures)} run(s) failed: {failures[0]}")
