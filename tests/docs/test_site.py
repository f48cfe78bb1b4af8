"""The documentation site builds with ``mkdocs build --strict``, and the README's links lead to it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "deltadist.LoraModel" in api and "save_finetuned" in api  # mkdocstrings rendered the API
    assert (tmp_path / "site" / "interactive_modify.png").is_file()


def test_every_page_is_in_the_nav_and_the_readme_links_exist() -> None:
    config = (REPO / "mkdocs.yml").read_text()
    pages = {path.relative_to(REPO / "docs").as_posix() for path in (REPO / "docs").rglob("*.md")}
    in_nav = set(re.findall(r":\s*([\w./-]+\.md)\s*$", config, re.M))
    assert pages == in_nav
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links and all((REPO / link).exists() for link in links), links


def test_readme_is_short_and_opens_with_the_two_commands() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    assert blocks[0].strip() == (
        'pip install torch==2.13.0 && pip install torch==2.13.0 -e ".[train]" && deltadist train')
    assert blocks[1].strip() == 'pip install torch==2.13.0 -e ".[dev]" && python -m pytest -n 2'
