"""The job's summary prints paths as written (rich markup and emoji codes are not interpreted)."""

from __future__ import annotations

import io

from rich.console import Console

from deltadist.training.loop import Metrics
from deltadist.training.report import print_summary


def test_paths_with_markup_or_emoji_codes_print_as_written() -> None:
    metrics = Metrics(accuracy_before=0.2, accuracy_after=0.9, train_seconds=1.0, total_seconds=2.0,
                      delta_bytes=2048, delta_path="runs/a:b:c/[bold]x", trainable_params=10,
                      total_params=100, device="cpu")
    out = io.StringIO()
    print_summary(metrics, "runs/a:b:c/metrics.json", Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    assert "runs/a:b:c/[bold]x (2.0 KB)" in text and "runs/a:b:c/metrics.json" in text
