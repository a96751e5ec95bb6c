"""The house rules of the layout: imports run one way, cli -> flows -> tasks -> library (the spanflow
package's subpackages), and tasks/ holds one Prefect task module per stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the pipeline's stages, the report, and the commands built of them: a study and an ensemble of registered versions
STAGES = {"prepare", "tune", "featurize", "train", "evaluate", "register", "promote", "report", "study", "ensemble"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        ("spanflow", ("tasks", "flows", "spanflow.cli")),  # the library
        ("tasks", ("flows", "spanflow.cli")),
        ("flows", ("spanflow.cli",)),
    ],
)
def test_no_module_imports_upward(folder: str, forbidden: tuple[str, ...]) -> None:
    found = []
    for path in _modules(folder):
        if path.name == "cli.py" and folder == "spanflow":
            continue  # the CLI sits on top of everything
        for name in imported_modules(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(REPO)} imports {name}")
    assert not found, "\n".join(found)


def test_tasks_holds_the_stage_tasks_only() -> None:
    modules = {p.stem for p in _modules("tasks")} - {"__init__"}
    assert modules == STAGES
    for stem in STAGES:
        assert "prefect" in imported_modules(REPO / "tasks" / f"{stem}.py"), f"tasks/{stem}.py defines no Prefect task"


def test_the_library_has_its_subpackages() -> None:
    packages = {p.parent.name for p in (REPO / "spanflow").glob("*/__init__.py")}
    assert {"data", "models", "training", "answering", "search", "tracking", "serving"} <= packages
    # the library may read Prefect's runtime context (for tags) but defines no task or flow
    defines = [p for p in (REPO / "spanflow").rglob("*.py") if {"prefect", "prefect.flows"} & imported_modules(p)]
    assert not defines, defines
