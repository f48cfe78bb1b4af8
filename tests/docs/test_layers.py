"""The house rules hold: the import-linter layers contract (pyproject.toml) is kept, the layers
figure in the docs is the one today's code draws, and no module or function outgrows its limit."""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_ROOT_MODULES = 400, 60, 6


def test_the_layers_contract_is_kept() -> None:
    lint = shutil.which("lint-imports")
    assert lint, "import-linter is in the dev extra: pip install -e '.[dev]'"
    result = subprocess.run([lint], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "deltadist layers KEPT" in result.stdout, result.stdout + result.stderr


def _figure_module():
    spec = importlib.util.spec_from_file_location("layers_figure", REPO / "docs" / "layers_figure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _structure(svg: str) -> str:
    """The figure without its sizes, which change with every edit."""
    return re.sub(r"\d+ modules, \d+ lines", "", svg)


def test_the_layers_figure_is_drawn_from_todays_code() -> None:
    committed = (REPO / "docs" / "layers.svg").read_text()
    assert _structure(_figure_module().draw()) == _structure(committed), \
        "the layers changed: run python docs/layers_figure.py and commit docs/layers.svg"


def _sources() -> list[Path]:
    return sorted((REPO / "deltadist").rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_modules_and_functions_stay_small(path: Path) -> None:
    source = path.read_text()
    assert source.count("\n") <= MAX_MODULE_LINES, f"{path.name}: split it by concern"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: {', '.join(long)}"


def test_few_modules_sit_at_the_top_of_the_package() -> None:
    root = [p.name for p in (REPO / "deltadist").glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(root) <= MAX_ROOT_MODULES, root
