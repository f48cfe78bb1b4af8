"""What ``deltadist train`` reports: the run's summary (``metrics.json``) and its log
(``metrics.jsonl``, one row per logged step or evaluation), also handed to the backends of
``training.report_to`` (:mod:`~deltadist.training.reporters`)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltadist.io.provenance import git_commit, library_versions
from deltadist.training.reporters import Reporters

METRICS_NAME = "metrics.json"
LOG_NAME = "metrics.jsonl"


@dataclass(frozen=True)
class Metrics:
    """What ``metrics.json`` holds: the run's summary."""

    task: str
    steps: int
    tokens: int
    """Real (unpadded) input tokens trained on, over all ranks."""
    train_seconds: float
    """Time in training steps in this process (since the resume, after one)."""
    total_seconds: float
    tokens_per_second: float
    eval_loss_before: float | None
    eval_loss: float | None
    """Mean loss per target token (per row for classification) on the evaluation rows."""
    accuracy_before: float | None
    accuracy_after: float | None
    """sequence_classification only."""
    delta_bytes: int
    """Size of the saved delta directory (weights and config)."""
    delta_path: str
    trainable_params: int
    total_params: int
    device: str
    """This rank's device (rank 0's in a distributed run)."""
    engine: str = "plain"
    world_size: int = 1
    resumed_from: int | None = None
    """The checkpoint step this run resumed from."""
    run_info: dict[str, Any] | None = None
    """What :func:`run_info` says (what every ``training.report_to`` backend got too)."""
    eval_metrics: dict[str, float] | None = None
    """Every metric of the final evaluation by name: loss, perplexity (LM tasks); accuracy,
    macro_f1 (classification); training.eval_generation's."""
    confusion_matrix: list[list[int]] | None = None
    """sequence_classification: rows of the final evaluation, ``[true class][predicted class]``."""
    class_names: list[str] | None = None
    best: dict[str, Any] | None = None
    """With eval_every: ``metric``, its best ``value``, that ``step``, and the ``path`` of its delta."""
    stopped_early: bool = False
    """Whether training.patience stopped the job before its last step."""


def run_info(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved ``config``, the library versions and the git commit of the working directory
    (``None`` outside a git repository)."""
    return {"config": config, "versions": library_versions(), "git_commit": git_commit()}


def peak_memory_bytes(device: torch.device) -> int | None:
    """The most memory this process has held: on a GPU the most torch allocated on ``device``, else
    the peak resident set size (``None`` where the platform does not say)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux counts KiB, macOS bytes


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended and flushed (main rank only); each row
    also goes to ``reporters``."""

    def __init__(self, path: Path, enabled: bool, reporters: Reporters | None = None) -> None:
        self.path, self.enabled, self.reporters = path, enabled, reporters
        self.rows = 0
        """Rows in the file (this run's, after :meth:`truncate_after`): what a checkpoint records."""
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int, rows: int | None = None) -> None:
        """Keep the rows written up to the checkpoint a run resumes from: its first ``rows`` rows
        (the count the checkpoint recorded), else (a checkpoint without the count) the rows of steps
        up to ``step``; ``step`` -1 drops every row. The rest (written after the checkpoint, such
        as the final evaluation of a run killed while saving its delta) goes."""
        if not self.enabled or not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        if step < 0:
            kept = []
        elif rows is not None:
            kept = lines[:rows]
        else:
            kept = [line for line in lines if _step_of(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.rows = len(kept)

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row``, its finite floats rounded to 6 places."""
        if not self.enabled:
            return
        row = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        self.rows += 1
        if self.reporters is not None:
            self.reporters.write(row)


def _step_of(line: str) -> float:
    """The step of a log line; a line cut off by a kill (not JSON) sorts after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
