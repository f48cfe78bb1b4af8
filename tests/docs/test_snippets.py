"""Every ```python block of README.md and docs/**/*.md runs as written.

Each block is executed on its own: a fresh namespace, a fresh temporary working directory (the
snippets write only relative paths), offline. A block that cannot run here (several processes, a
GPU, a browser) is preceded by a marker naming why and, where one exists, the test covering it::

    <!-- not run: needs 2 processes (tested in tests/distributed/test_engines.py) -->

Such blocks are still compiled, so they stay valid Python. A block that only includes a test
file (``--8<-- "tests/walkthroughs/test_add_a_method.py"``, pymdownx.snippets) shows code that
pytest runs as that test; it must name an existing test file. Tests are named by file and block
index (``docs/methods.md#2``: the third ```python block of that file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*not run:\s*(.*?)\s*-->\s*$", re.S)
INCLUDE = re.compile(r'^--8<-- "([^"]+)"$')
MAX_NOT_RUN = 8
"""Blocks that cannot run in one CPU process are the exception: keep them few."""


@dataclass(frozen=True)
class Block:
    """One ```python block: where it is, its code, and why it is not run (``None``: it runs)."""

    path: Path
    index: int
    code: str
    first_line: int
    not_run: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}#{self.index}"


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def blocks_of(path: Path) -> list[Block]:
    text = path.read_text()
    found = []
    for index, match in enumerate(FENCE.finditer(text)):
        before = text[: match.start()].rstrip("\n")
        last_line = before.rsplit("\n", 1)[-1]
        marker = MARKER.search(last_line)
        first_line = text.count("\n", 0, match.start(1)) + 1
        found.append(Block(path, index, match.group(1), first_line, marker.group(1) if marker else None))
    return found


def included_file(block: Block) -> str | None:
    """The file a block only includes, or ``None`` for a block of code."""
    match = INCLUDE.match(block.code.strip())
    return match.group(1) if match else None


BLOCKS = [block for path in markdown_files() for block in blocks_of(path)]
INCLUDED = [block for block in BLOCKS if included_file(block) is not None]
BLOCKS = [block for block in BLOCKS if included_file(block) is None]
RUN = [block for block in BLOCKS if block.not_run is None]
NOT_RUN = [block for block in BLOCKS if block.not_run is not None]


def _compiled(block: Block):
    # Line numbers in tracebacks point into the markdown file.
    return compile("\n" * (block.first_line - 1) + block.code, str(block.path), "exec")


@pytest.mark.parametrize("block", RUN, ids=[block.id for block in RUN])
def test_snippet_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    exec(_compiled(block), {"__name__": "__snippet__"})


@pytest.mark.parametrize("block", NOT_RUN, ids=[block.id for block in NOT_RUN])
def test_not_run_snippet_compiles_and_says_why(block: Block) -> None:
    assert len(block.not_run) > 10, f"{block.id}: say why the block cannot run here"
    _compiled(block)


def test_snippets_are_found_and_few_are_not_run() -> None:
    assert len(RUN) >= 15 and any(block.path.name == "README.md" for block in RUN)
    assert len(NOT_RUN) <= MAX_NOT_RUN, [block.id for block in NOT_RUN]


def test_the_opendelta_walkthrough_is_executed() -> None:
    """The "Must try" walkthrough (formerly in the README) saves, reloads, detaches and re-attaches."""
    walkthrough = [block for block in RUN if block.path.name == "walkthrough.md"]
    assert any("from_finetuned" in block.code and "detach" in block.code for block in walkthrough)


@pytest.mark.parametrize("block", INCLUDED, ids=[block.id for block in INCLUDED])
def test_an_included_block_is_a_test_file_pytest_runs(block: Block) -> None:
    path = REPO / included_file(block)
    assert path.is_file() and path.parts[-2] != "docs", f"{block.id}: {path} is not there"
    assert path.name.startswith("test_") and "tests" in path.relative_to(REPO).parts
