"""Shared output of the benchmarks: a rich table on stdout, JSON and a bar chart (PNG) in results/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"


def missing_peer(label: str, package: str, columns: Sequence[str]) -> list[str]:
    """A table row that says ``label`` was not measured because ``package`` is not installed (a
    peer's row is never dropped without a word)."""
    return [label, f"not measured: {package} is not installed (pip install {package})",
            *["-"] * (len(columns) - 2)]


def report(name: str, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
           data: dict[str, Any], bars: dict[str, float], bar_label: str) -> None:
    """Print ``rows`` under ``columns``; write ``results/<name>.json`` (``data``) and
    ``results/<name>.png`` (a horizontal bar per entry of ``bars``, labelled ``bar_label``).

    The PNG needs matplotlib (``pip install matplotlib``); without it only the JSON is written.
    """
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == columns[0] else "right")
    for row in rows:
        table.add_row(*[str(cell) for cell in row])
    Console(width=120).print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {RESULTS / f'{name}.json'} (no PNG: matplotlib is not installed)")
        return
    figure, axes = plt.subplots(figsize=(7, 0.5 * len(bars) + 1.2))
    labels = list(bars)
    axes.barh(labels[::-1], [bars[label] for label in labels][::-1], color="#7a5195")
    axes.set_xlabel(bar_label)
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(RESULTS / f"{name}.png", dpi=120)
    plt.close(figure)
    print(f"wrote {RESULTS / f'{name}.json'} and {RESULTS / f'{name}.png'}")
