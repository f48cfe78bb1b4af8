"""What ``deltadist train`` reports: the run's summary (``metrics.json``) and its log
(``metrics.jsonl``, one row per logged step or evaluation)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended and flushed (main rank only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop the lines of steps after ``step`` (written after the checkpoint a run resumes from)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row``, its finite floats rounded to 6 places."""
        if not self.enabled:
            return
        row = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
