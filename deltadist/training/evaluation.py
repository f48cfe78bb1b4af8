"""Evaluating the delta during ``deltadist train``: the mean loss (and perplexity, or accuracy,
macro-F1 and the confusion matrix) over the evaluation rows, each rank taking its share of every
batch; the generated-text metric is :mod:`~deltadist.training.generation_eval`'s."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from tqdm import tqdm

from deltadist.errors import ConfigError
from deltadist.training.batching import global_batches, loss_units, micro_batches
from deltadist.training.eval_metrics import accuracy, confusion_counts, macro_f1, perplexity
from deltadist.training.steps import StepRunner
from deltadist.training.text_data import TokenizedExample


@dataclass(frozen=True)
class Evaluation:
    """One evaluation (what a checkpoint's run state keeps of the one before training)."""

    loss: float
    accuracy: float | None
    perplexity: float | None = None
    """Language-model tasks: ``exp(loss)``."""
    macro_f1: float | None = None
    confusion: list[list[int]] | None = None
    """sequence_classification: ``[true class][predicted class]`` row counts."""
    generation: dict[str, float] | None = None
    """``training.eval_generation``: its metric's name -> the fraction of rows that met it."""

    def metrics(self) -> dict[str, float]:
        """Every metric it has, by the name ``training.best_metric`` takes."""
        found = {k: v for k, v in asdict(self).items()
                 if k in ("loss", "perplexity", "accuracy", "macro_f1") and v is not None}
        return {**found, **(self.generation or {})}

    def log_row(self) -> dict[str, Any]:
        """Its fields of a ``metrics.jsonl`` row: ``eval_<metric>`` each."""
        return {f"eval_{name}": value for name, value in self.metrics().items()}


@torch.no_grad()
def evaluate(steps: StepRunner, examples: Sequence[TokenizedExample], batch_size: int,
             desc: str, classes: int | None = None) -> Evaluation:
    """The evaluation rows' metrics, each rank taking its share of a batch (``classes``: the number
    of classes of sequence_classification)."""
    engine, task = steps.engine, steps.task
    steps.runner.eval()
    # One tensor summed over ranks: the loss sum, then the confusion counts (exact in float32
    # up to 2^24 rows).
    sums = torch.zeros(1 + (classes or 0) ** 2, device=engine.device)
    batches = list(global_batches(examples, range(len(examples)), batch_size))
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not engine.is_main):
        micro, = micro_batches(batch, task, steps.collate, engine.rank, engine.world_size, 1)
        if micro.loss_scale == 0:  # a stand-in row: the forward runs (collectives), nothing counts
            steps.forward(micro)
            continue
        loss_sum, predicted = steps.forward(micro)
        sums[0] += loss_sum
        if classes:
            labels = micro.inputs["labels"].to(predicted.device)
            sums[1:] += confusion_counts(predicted, labels, classes).flatten().float()
    totals = engine.sum_over_ranks(sums).cpu()
    units = sum(loss_units(task, e) for e in examples)
    if not units:
        raise ConfigError("data.eval: no evaluation row has a target token left after truncation; "
                          "raise model.max_length.")
    loss = float(totals[0]) / units
    if not classes:
        return Evaluation(loss, None, perplexity=perplexity(loss))
    confusion = totals[1:].round().long().reshape(classes, classes)
    return Evaluation(loss, accuracy(confusion), macro_f1=macro_f1(confusion), confusion=confusion.tolist())
