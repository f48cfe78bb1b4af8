"""Draws ``docs/layers.svg``: deltadist's layers (pyproject.toml's import-linter contract) as rows,
top to bottom, each with its size and the layers below it that it imports.

Read from the source (nothing is imported or run); ``tests/docs/test_layers.py`` checks that the
committed figure is the one this draws from today's code.

    python docs/layers_figure.py          # rewrites docs/layers.svg
"""

from __future__ import annotations

import ast
import tomllib
from collections import Counter
from pathlib import Path
from xml.sax.saxutils import escape

REPO = Path(__file__).resolve().parents[1]
FIGURE = REPO / "docs" / "layers.svg"
ROW, GAP, LEFT, WIDTH = 44, 12, 20, 860


def layers() -> list[list[str]]:
    """Rows of the contract, top first; siblings (``a | b``) share a row."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c["type"] == "layers")
    return [[name.strip() for name in row.split("|")] for row in contract["layers"]]


def _unit(module: str, units: list[str]) -> str | None:
    return next((u for u in units if module == u or module.startswith(u + ".")), None)


def measure(units: list[str]) -> tuple[Counter, Counter, Counter]:
    """Modules and lines per unit, and imports between units (module-level and lazy alike)."""
    modules, lines, edges = Counter(), Counter(), Counter()
    for path in sorted((REPO / "deltadist").rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        unit = _unit(name, units)
        if unit is None:
            continue
        source = path.read_text()
        modules[unit] += 1
        lines[unit] += source.count("\n")
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(source)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in {_unit(t, units) for t in targets} - {None, unit}:
                edges[unit, target] += 1
    return modules, lines, edges


def draw() -> str:
    rows = layers()
    units = [u for row in rows for u in row]
    modules, lines, edges = measure(units)
    height = 30 + len(rows) * (ROW + GAP)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{LEFT + WIDTH + 20}" height="{height}" '
           'font-family="sans-serif" font-size="13">',
           '<defs><marker id="a" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto">'
           '<path d="M0,0 L8,4 L0,8 z" fill="#5a6e8c"/></marker></defs>',
           f'<rect width="{LEFT + WIDTH + 20}" height="{height}" fill="white"/>',
           f'<path d="M10,24 V{height - 16}" stroke="#5a6e8c" stroke-width="2" marker-end="url(#a)">'
           '<title>imports point down only</title></path>']
    for r, row in enumerate(rows):
        width = (WIDTH - GAP * (len(row) - 1)) / len(row)
        for i, unit in enumerate(row):
            x, y = LEFT + 10 + i * (width + GAP), 16 + r * (ROW + GAP)
            below = sorted((t for (s_, t) in edges if s_ == unit), key=units.index)
            uses = ", ".join(t.removeprefix("deltadist.") for t in below) or "nothing of deltadist"
            out.append(f'<rect x="{x:.0f}" y="{y}" width="{width:.0f}" height="{ROW}" rx="6" '
                       'fill="#e8eef8" stroke="#5a6e8c"/>')
            out.append(f'<text x="{x + 10:.0f}" y="{y + 18}"><tspan font-weight="bold">'
                       f'{escape(unit.removeprefix("deltadist."))}</tspan>'
                       f'<tspan fill="#444"> {modules[unit]} modules, {lines[unit]} lines</tspan></text>')
            out.append(f'<text x="{x + 10:.0f}" y="{y + 35}" fill="#444" font-size="11">imports '
                       f'{escape(uses)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    FIGURE.write_text(draw())
    print(f"wrote {FIGURE.relative_to(REPO)}")
