"""The job's summary prints paths as written (rich markup and emoji codes are not interpreted)."""

from __future__ import annotations

import io

from rich.console import Console

from deltadist.training.metrics import Metrics
from deltadist.training.report import print_summary


def test_paths_with_markup_or_emoji_codes_print_as_written() -> None:
    metrics = Metrics(task="sequence_classification", steps=3, tokens=100, tokens_per_second=50.0,
                      eval_loss_before=1.5, eval_loss=0.5, accuracy_before=0.2, accuracy_after=0.9,
                      train_seconds=1.0, total_seconds=2.0, delta_bytes=2048,
                      delta_path="runs/a:b:c/[bold]x", trainable_params=10, total_params=100, device="cpu")
    out = io.StringIO()
    print_summary(metrics, "runs/a:b:c/metrics.json", Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    assert "runs/a:b:c/[bold]x (2.0 KB)" in text and "runs/a:b:c/metrics.json" in text


def test_a_language_task_shows_its_loss_tokens_and_resume() -> None:
    metrics = Metrics(task="causal_lm", steps=40, tokens=12_345, tokens_per_second=678.0,
                      eval_loss_before=3.25, eval_loss=1.125, accuracy_before=None, accuracy_after=None,
                      train_seconds=1.0, total_seconds=2.0, delta_bytes=2048, delta_path="d",
                      trainable_params=10, total_params=100, device="cpu", resumed_from=20)
    out = io.StringIO()
    print_summary(metrics, "m.json", Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    assert "deltadist train (causal_lm)" in text and "3.2500 -> 1.1250" in text
    assert "40 steps, 12,345 tokens, 678 tokens/s (resumed after step 20)" in text
    assert "accuracy" not in text
