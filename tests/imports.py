"""The project's own import graph, read from the source (ast), never by importing it.

Two facts the tests hold the project to: every stage's dvc.yaml deps are exactly the
project modules its command runs (otherwise a code change leaves stale cached outputs),
and the wings of ``up/`` import only downward.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("up", "stages")


def module_file(name: str) -> Path | None:
    """up.models.tokenizer -> up/models/tokenizer.py (or the package's __init__.py)."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Dotted names of the project modules ``path`` imports (anywhere in the file, lazy
    imports inside functions included), with every package whose __init__ runs."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] not in PROJECT_PACKAGES:
                continue
            while name:  # importing a.b.c runs a/__init__, a/b/__init__ too
                if module_file(name) is not None:
                    found.add(name)
                name = name.rpartition(".")[0]
    return found


def closure(start: Path) -> set[Path]:
    """Every project file that runs when ``start`` runs: itself and its transitive imports."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [module_file(name) for name in imported_modules(path)]
    return seen


def docstring_only(path: Path) -> bool:
    """A file that holds a docstring and nothing else cannot change a result."""
    body = ast.parse(path.read_text()).body
    return len(body) <= 1 and all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                                  for n in body)


def stage_code(command_module: str) -> list[str]:
    """The code deps of a stage whose command is ``up <command_module>``: the CLI, the
    stage module and everything they import, minus docstring-only package files."""
    files = closure(ROOT / "stages" / "cli.py") | closure(ROOT / "stages" / f"{command_module}.py")
    return sorted(str(f.relative_to(ROOT)) for f in files if not docstring_only(f))
