"""What every benchmark of the suite returns, and what the runner does with it: a table on stdout,
``results/<name>.json`` (with the machine, versions, date and commit), ``results/<name>.png``
(grouped bars with the spread of the interleaved rounds), the tables between markers in the README,
and the targets checked (``--check``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
README = ROOT / "README.md"
TABLE_PAGES = (README, ROOT / "docs" / "benchmarks.md")
"""Where the runner rewrites a benchmark's table (the pages holding its markers)."""


@dataclass(frozen=True)
class Ratio:
    """A ratio measured round by round (``value``: the median; ``low``/``high``: the quartiles)."""

    value: float
    low: float
    high: float

    @classmethod
    def of(cls, numerators: Sequence[float], denominators: Sequence[float]) -> "Ratio":
        """Per-round ratios of two interleaved series (each round saw the same machine state)."""
        ratios = sorted(a / b for a, b in zip(numerators, denominators))
        if len(ratios) < 4:
            return cls(statistics.median(ratios), ratios[0], ratios[-1])
        quartiles = statistics.quantiles(ratios, n=4)
        return cls(statistics.median(ratios), quartiles[0], quartiles[2])

    @classmethod
    def spread(cls, values: Sequence[float]) -> "Ratio":
        """A plain series' median and quartiles (seconds, say)."""
        return cls.of(values, [1.0] * len(values))

    @property
    def noise(self) -> float:
        """Half the interquartile spread, relative to the median."""
        return (self.high - self.low) / 2 / self.value

    def __str__(self) -> str:
        return f"{self.value:.2f}x"


@dataclass(frozen=True)
class Check:
    """One target: ``what`` must be at most ``target`` (allowing this run's ``noise``)."""

    what: str
    value: float
    target: float
    noise: float

    @property
    def passed(self) -> bool:
        return self.value <= self.target * (1 + self.noise)


@dataclass
class Result:
    """A benchmark's outcome."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]]
    data: dict[str, Any]
    bars: dict[str, dict[str, Ratio]] = field(default_factory=dict)
    """Group (e.g. a method) -> label (deltadist, floor, a peer) -> ratio, drawn side by side."""
    bar_label: str = ""
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def machine() -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    versions = {}
    for package in ("torch", "transformers", "peft", "adapters", "deepspeed"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "versions": versions, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def show(result: Result) -> None:
    table = Table(title=result.title)
    for column in result.columns:
        table.add_column(column, justify="left" if column == result.columns[0] else "right")
    for row in result.rows:
        table.add_row(*[str(cell) for cell in row])
    Console(width=140).print(table)
    for check in result.checks:
        mark = "ok  " if check.passed else "MISS"
        print(f"{mark} {check.what}: {check.value:.3f} "
              f"(target <= {check.target:.2f}, noise {check.noise:.1%})")


def write(result: Result, quick: bool) -> Path:
    """``results/<name>.json`` and ``results/<name>.png``; returns the JSON's path."""
    RESULTS.mkdir(exist_ok=True)
    payload = {"name": result.name, "title": result.title, "quick": quick, "machine": machine(),
               "columns": result.columns, "rows": [[str(c) for c in row] for row in result.rows],
               "checks": [{**vars(c), "passed": c.passed} for c in result.checks], "notes": result.notes,
               "data": result.data}
    path = RESULTS / f"{result.name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    if result.bars:
        _plot(result, RESULTS / f"{result.name}.png")
    return path


def _plot(result: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(result.bars)
    labels = list(dict.fromkeys(label for bars in result.bars.values() for label in bars))
    width = 0.8 / len(labels)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4))
    for index, label in enumerate(labels):
        xs = [g + index * width for g, group in enumerate(groups) if label in result.bars[group]]
        ratios = [result.bars[group][label] for group in groups if label in result.bars[group]]
        axes.bar(xs, [r.value for r in ratios], width, label=label,
                 yerr=[[r.value - r.low for r in ratios], [r.high - r.value for r in ratios]], capsize=2)
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, rotation=20, ha="right",
                    fontsize=8)
    axes.set_ylabel(result.bar_label)
    axes.set_title(result.title, fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown_table(result: Result) -> str:
    lines = ["| " + " | ".join(result.columns) + " |", "|" + "---|" * len(result.columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in result.rows]
    return "\n".join(lines)


def checks_line(result: Result) -> str | None:
    """One sentence on the result's targets in this run: all met, or which were missed and by how
    much (``None`` where it has no targets)."""
    if not result.checks:
        return None
    missed = [c for c in result.checks if not c.passed]
    if not missed:
        return f"Targets: all {len(result.checks)} met in this run (`--check`)."
    listed = "; ".join(f"{c.what} {c.value:.2f} (target {c.target:.2f}, noise {c.noise:.0%})" for c in missed)
    return f"Targets missed in this run ({len(missed)} of {len(result.checks)}): {listed}."


def update_readme(result: Result, source: Path, path: Path = README) -> bool:
    """Replace the text between ``<!-- benchmark:NAME -->`` and ``<!-- /benchmark:NAME -->`` with the
    result's table and notes; ``False`` where the README has no such markers."""
    text = path.read_text()
    pattern = re.compile(rf"(<!-- benchmark:{result.name} -->\n).*?(<!-- /benchmark:{result.name} -->)", re.S)
    if not pattern.search(text):
        return False
    body = markdown_table(result) + "\n"
    body += "".join(f"\n{note}\n" for note in [*result.notes, *filter(None, [checks_line(result)])])
    body += f"\n<sub>{source.relative_to(ROOT)}</sub>\n"
    path.write_text(pattern.sub(lambda m: m.group(1) + body + m.group(2), text))
    return True
