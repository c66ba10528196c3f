"""The floor plan holds: dvc.yaml's code deps are the imports, wings import downward,
and no checkpoint can run code on load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.imports import ROOT, closure, docstring_only, imported_modules, module_file, stage_code
from up.core.io import load_torch

# Lower rank = lower floor. A module may import its own wing or a lower rank; training and
# generation share a rank, so neither imports the other.
WING_RANK = {"core": 0, "models": 1, "data": 2, "training": 3, "generation": 3, "evaluation": 4}


def stage_command_module(stages: dict, name: str) -> str:
    stage = stages[name]
    cmd = stage.get("cmd") or stages[name.replace("_derived", "")]["cmd"]
    return cmd.split()[1]  # "${launcher} train --variant ..." / "up prepare"


def code_deps(stage: dict) -> list[str]:
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
    return sorted(d for d in deps if d.endswith(".py"))


@pytest.mark.parametrize("name", sorted(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]))
def test_stage_code_deps_are_exactly_its_imports(name):
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    listed, imported = set(code_deps(stages[name])), set(stage_code(stage_command_module(stages, name)))
    assert listed == imported, (
        f"dvc.yaml stage {name}: missing deps {sorted(imported - listed)}, deps it does not "
        f"import {sorted(listed - imported)}")


def test_deps_check_catches_an_import_without_its_dep(tmp_path, monkeypatch):
    """Adding an import to a stage module changes what the check demands."""
    import tests.imports as imports

    fake = tmp_path / "stages"
    fake.mkdir()
    (fake / "cli.py").write_text("")
    (fake / "prepare.py").write_text("from up.core import io\n")
    monkeypatch.setattr(imports, "ROOT", tmp_path)
    (tmp_path / "up" / "core").mkdir(parents=True)
    for f in ("up/__init__.py", "up/core/__init__.py"):
        (tmp_path / f).write_text('"""A wing."""\n')
    for f in ("up/core/io.py", "up/core/paths.py"):
        (tmp_path / f).write_text("VALUE = 1\n")
    before = set(imports.stage_code("prepare"))
    (fake / "prepare.py").write_text("from up.core import io\nfrom up.core import paths\n")
    after = set(imports.stage_code("prepare"))
    assert after - before == {"up/core/paths.py"}


def test_imports_point_down_the_wings():
    for path in sorted((ROOT / "up").rglob("*.py")):
        parts = path.relative_to(ROOT / "up").parts
        if len(parts) == 1:
            continue
        wing = parts[0]
        assert wing in WING_RANK, f"{path}: wing {wing!r} has no rank in this test"
        for name in imported_modules(path):
            assert not name.startswith("stages"), f"{path} imports {name}: up/ never imports stages/"
            target = name.split(".")
            if len(target) < 2 or target[1] == wing:
                continue
            assert WING_RANK[target[1]] < WING_RANK[wing], \
                f"{path} ({wing}) imports {name} ({target[1]}): imports point down the wings only"


def test_package_files_only_describe_their_wing():
    """Package __init__ files are docstrings (so leaving them out of deps is safe)."""
    for init in (ROOT / "up").rglob("__init__.py"):
        assert docstring_only(init), f"{init} holds code"
        assert ast_docstring(init), f"{init} lacks the wing's one-line purpose"


def ast_docstring(path: Path) -> str | None:
    import ast

    return ast.get_docstring(ast.parse(path.read_text()))


def test_closure_follows_lazy_imports():
    cli = closure(ROOT / "stages" / "cli.py")
    assert module_file("up.core.params") in cli  # imported inside a function


def test_pipeline_checkpoints_load_weights_only(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"model": {"w": torch.ones(2)}, "config": {"depth": 2, "name": "x"}}, path)
    assert load_torch(path)["config"]["depth"] == 2
