"""The job's final summary, printed with rich."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from deltadist.training.metrics import Metrics


def format_bytes(size: int) -> str:
    """``1536`` -> ``"1.5 KB"``; ``3_300_000`` -> ``"3.1 MB"`` (binary units)."""
    if size < 1024 ** 2:
        return f"{size / 1024:.1f} KB"
    return f"{size / 1024 ** 2:.1f} MB"


def print_summary(metrics: Metrics, metrics_path: str, console: Console | None = None) -> None:
    """Evaluation before -> after, steps and tokens, trainable parameters, time, and where the
    delta went."""
    table = Table(title=f"deltadist train ({metrics.task})", show_header=False, title_style="bold")
    table.add_column(style="bold cyan")
    table.add_column()
    if metrics.accuracy_before is not None and metrics.accuracy_after is not None:
        gain = metrics.accuracy_after - metrics.accuracy_before
        table.add_row("eval accuracy", f"{metrics.accuracy_before:.1%} -> "
                      f"[bold green]{metrics.accuracy_after:.1%}[/] ({gain:+.1%})")
    if metrics.eval_loss is not None:
        before = f"{metrics.eval_loss_before:.4f} -> " if metrics.eval_loss_before is not None else ""
        table.add_row("eval loss", f"{before}[bold green]{metrics.eval_loss:.4f}[/]")
    resumed = f" (resumed after step {metrics.resumed_from})" if metrics.resumed_from is not None else ""
    table.add_row("steps", f"{metrics.steps:,} steps, {metrics.tokens:,} tokens, "
                  f"{metrics.tokens_per_second:,.0f} tokens/s{resumed}")
    ratio = metrics.trainable_params / metrics.total_params
    table.add_row("trainable params",
                  f"{metrics.trainable_params:,} of {metrics.total_params:,} ({ratio:.3%})")
    where = metrics.device
    if metrics.world_size > 1 or metrics.engine != "plain":
        where = f"{metrics.world_size} × {metrics.device} ({metrics.engine})"
    table.add_row("time", f"{metrics.train_seconds:.1f} s training, {metrics.total_seconds:.1f} s in all,"
                  f" on {where}")
    # Paths are user text: escaped, so "[x]" or ":b:" in a directory name prints as written.
    table.add_row("delta", Text(f"{metrics.delta_path} ({format_bytes(metrics.delta_bytes)})"))
    table.add_row("metrics", Text(metrics_path))
    (console or Console()).print(table)
