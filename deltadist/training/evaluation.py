"""Evaluating the delta during ``deltadist train``: the mean loss (and accuracy) over the
evaluation rows, each rank taking its share of every batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm import tqdm

from deltadist.errors import ConfigError
from deltadist.training.batching import global_batches, loss_units, micro_batches
from deltadist.training.steps import StepRunner
from deltadist.training.text_data import TokenizedExample


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: what a checkpoint's run state keeps of the one before training."""

    loss: float
    accuracy: float | None

    def log_row(self) -> dict[str, Any]:
        """Its fields of a ``metrics.jsonl`` row (no accuracy where the task has none)."""
        row: dict[str, Any] = {"eval_loss": self.loss}
        if self.accuracy is not None:
            row["eval_accuracy"] = self.accuracy
        return row


@torch.no_grad()
def evaluate(steps: StepRunner, examples: Sequence[TokenizedExample], batch_size: int,
             desc: str) -> Evaluation:
    """Mean loss (and accuracy) over the evaluation rows, each rank taking its share of a batch."""
    engine, task = steps.engine, steps.task
    steps.runner.eval()
    sums = torch.zeros(2, device=engine.device)
    batches = list(global_batches(examples, range(len(examples)), batch_size))
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not engine.is_main):
        micro, = micro_batches(batch, task, steps.collate, engine.rank, engine.world_size, 1)
        loss_sum, correct = steps.forward(micro)
        sums += torch.stack([loss_sum, correct.float()]) * float(micro.loss_scale > 0)
    loss_total, correct_total = engine.sum_over_ranks(sums).tolist()
    units = sum(loss_units(task, e) for e in examples)
    if not units:
        raise ConfigError("data.eval: no evaluation row has a target token left after truncation; "
                          "raise model.max_length.")
    accuracy = correct_total / len(examples) if task == "sequence_classification" else None
    return Evaluation(loss_total / units, accuracy)
