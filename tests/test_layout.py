"""The house: imports follow the data (docs/architecture.md).

Every module of the shared layer and the stages is parsed (imports inside functions included) and each import
of a project package is checked against the order `defectforge` (shared, imports no stage) -> `synth` ->
`pretrain` -> `finetune` -> `evaluate` -> `study`: a module may import its own package and those before it.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORDER = ["defectforge", "synth", "pretrain", "finetune", "evaluate", "study"]


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import of a project package in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in ORDER]
    return found


def modules() -> list[Path]:
    return sorted(p for pkg in ORDER if (REPO / pkg).is_dir() for p in (REPO / pkg).rglob("*.py"))


def test_every_package_of_the_order_exists():
    missing = [pkg for pkg in ORDER if not (REPO / pkg / "__init__.py").is_file()]
    assert not missing, f"packages named in the layout order but absent: {missing}"


def test_every_package_is_installed_and_linted():
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert [pkg for pkg in ORDER if f"{pkg}*" not in include] == [], "missing from a non-editable install"
    lint = next(line.split() for line in (REPO / "Makefile").read_text().splitlines() if "ruff check" in line)
    assert [pkg for pkg in ORDER if pkg not in lint] == [], "missing from `make lint`"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_follow_the_data(path: Path):
    own = ORDER.index(path.relative_to(REPO).parts[0])
    against = [f"line {line}: imports {pkg}" for line, pkg in project_imports(path) if ORDER.index(pkg) > own]
    assert not against, f"{path.relative_to(REPO)} imports against the data flow: {against}"


def test_the_check_finds_an_import_against_the_flow(tmp_path):
    bad = tmp_path / "mod.py"
    bad.write_text("def f():\n    from evaluate.run import main\n    import finetune.models\n")
    assert project_imports(bad) == [(2, "evaluate"), (3, "finetune")]
