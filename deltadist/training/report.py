"""The job's final summary, and the dry run's description of a job, printed with rich."""

from __future__ import annotations

import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from deltadist.training.config import to_dict
from deltadist.training.dry_run import DryRun
from deltadist.training.eval_metrics import LOWER_IS_BETTER
from deltadist.training.evaluation import Evaluation
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
    for name, value in (metrics.eval_metrics or {}).items():
        if name not in ("loss", "accuracy"):
            table.add_row(f"eval {name.replace('_', ' ')}", _metric_text(name, value))
    if metrics.best is not None:
        best = metrics.best
        table.add_row(f"best {best['metric'].replace('_', ' ')}",
                      Text(f"{_metric_text(best['metric'], best['value'])} at step {best['step']:,} "
                           f"({best['path']})"))
    resumed = f" (resumed after step {metrics.resumed_from})" if metrics.resumed_from is not None else ""
    stopped = " (stopped early: training.patience)" if metrics.stopped_early else ""
    table.add_row("steps", f"{metrics.steps:,} steps, {metrics.tokens:,} tokens, "
                  f"{metrics.tokens_per_second:,.0f} tokens/s{resumed}{stopped}")
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
    console = console or Console()
    console.print(table)
    if metrics.confusion_matrix is not None:
        console.print(_confusion_table(metrics.confusion_matrix, metrics.class_names))


def print_evaluation(evaluation: Evaluation, names: list[str] | None, where: str,
                     console: Console | None = None) -> None:
    """One evaluation's metrics (``deltadist eval``), and its confusion matrix if it has one."""
    console = console or Console()
    table = Table(title=f"deltadist eval ({where})", show_header=False, title_style="bold")
    table.add_column(style="bold cyan")
    table.add_column()
    for name, value in evaluation.metrics().items():
        table.add_row(name, _metric_text(name, value))
    console.print(table)
    if evaluation.confusion is not None:
        console.print(_confusion_table(evaluation.confusion, names))


def _metric_text(name: str, value: float) -> str:
    """A loss or perplexity as a number, any other metric (a fraction of rows) as a percentage."""
    return f"{value:.4f}" if name in LOWER_IS_BETTER else f"{value:.1%}"


def _confusion_table(confusion: list[list[int]], names: list[str] | None) -> Table:
    """The final evaluation's rows by true class (table rows) and predicted class (columns)."""
    names = names or [str(index) for index in range(len(confusion))]
    table = Table(title="eval confusion matrix", title_style="bold")
    table.add_column("true / predicted", style="bold cyan")
    for name in names:
        table.add_column(Text(name), justify="right")
    for name, row in zip(names, confusion):
        table.add_row(Text(name), *(str(count) for count in row))
    return table


def print_dry_run(run: DryRun, console: Console | None = None) -> None:
    """The resolved config as YAML, then the plan (engine, batches, steps, data, parameters) and the
    delta's sites with the shapes of its parameters."""
    console = console or Console()
    console.out("# deltadist train --dry-run: the resolved config\n"
                + yaml.safe_dump(to_dict(run.cfg), sort_keys=False, allow_unicode=True), highlight=False)
    console.print(_plan_table(run))
    count = sum(not site.shared for site in run.sites)
    sites = Table(title=f"{count} site{'s' * (count != 1)} of the delta ({run.cfg.delta.get('delta_type')})",
                  title_style="bold")
    sites.add_column("site", style="cyan", overflow="fold")
    sites.add_column("parameter", overflow="fold")
    sites.add_column("shape", no_wrap=True)
    for site in run.sites:
        for index, (name, shape) in enumerate(site.parameters.items()):
            label = f"{site.name} (shared)" if site.shared else site.name
            sites.add_row(Text(label if index == 0 else ""), Text(name), _shape(shape))
    for key, shape in run.kept.items():
        sites.add_row(Text(key), Text("(the backbone's, trained)"), _shape(shape))
    console.print(sites)


def _plan_table(run: DryRun) -> Table:
    """Engine, batches, steps, data, parameters, output directory."""
    t, plan, ranks = run.cfg.training, run.plan, run.world_size
    table = Table(title=f"deltadist train --dry-run ({run.cfg.task})", show_header=False, title_style="bold")
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    dtype = str(run.dtype).removeprefix("torch.")
    table.add_row("engine", f"{run.engine} on {ranks} rank{'s' * (ranks > 1)}; backbone {dtype}")
    per_rank = plan.micro_batch_size * plan.accumulation
    table.add_row("batch", f"{plan.batch_size} rows a step: {per_rank} a rank = {plan.accumulation} "
                  f"micro-batch{'es' * (plan.accumulation > 1)} of {plan.micro_batch_size} "
                  f"(gradient accumulation {plan.accumulation})")
    length = f"max_steps {t.max_steps}" if t.max_steps is not None else \
        f"{t.epochs} epoch{'s' * (t.epochs > 1)}"
    resumed = f"; resuming after step {run.resumed_from:,}" if run.resumed_from is not None else ""
    table.add_row("steps", f"{plan.total_steps:,} steps ({plan.steps_per_epoch:,} an epoch, {length}); "
                  f"warm-up {t.warmup_steps}, then {t.scheduler}; lr {t.lr:g}{resumed}")
    train_rows, eval_rows = run.rows
    train_tokens, eval_tokens = run.tokens
    packed = f", {run.examples:,} packed examples" if run.examples != train_rows else ""
    if run.cfg.data.streaming:
        buffer = run.cfg.data.shuffle_buffer
        order = f"shuffled through a buffer of {buffer:,} rows" if buffer else "in file order"
        table.add_row("train data", Text(f"streamed from {run.cfg.data.train} {order}: "
                                         f"{plan.total_steps * plan.batch_size:,} rows read over the run "
                                         "(not counted ahead; the first step's rows checked)"))
    else:
        table.add_row("train data", f"{train_rows:,} rows{packed}, {train_tokens:,} tokens")
    for index, (shown, rows, drawn) in enumerate(run.sources):  # several sources, mixed by weight
        table.add_row(f"  source {index}", Text(f"{shown}: {rows:,} rows, {drawn:,} examples an epoch "
                                                f"({drawn / max(run.examples, 1):.1%})"))
    table.add_row("eval data", "none" if eval_rows is None else f"{eval_rows:,} rows, {eval_tokens:,} tokens")
    ratio = run.trainable_params / max(run.total_params, 1)
    table.add_row("trainable params", f"{run.trainable_params:,} of {run.total_params:,} ({ratio:.3%})")
    if run.cfg.model.quantize is not None:
        table.add_row(f"{run.cfg.model.quantize} weights", Text(f"{len(run.quantized)} linear layers: "
                                                                 + ", ".join(run.quantized)))
    table.add_row("output_dir", Text(f"{run.cfg.output_dir} (nothing written)"))
    return table


def _shape(shape: tuple[int, ...]) -> Text:
    return Text("[" + ", ".join(str(n) for n in shape) + "]")
