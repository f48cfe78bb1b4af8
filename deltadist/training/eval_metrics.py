"""The evaluation's metrics from counts that sum over ranks: perplexity from the mean token loss,
accuracy and macro-F1 from a confusion matrix, and which direction of each metric is better."""

from __future__ import annotations

import math

import torch

LOWER_IS_BETTER = frozenset({"loss", "perplexity"})
"""Metrics where a smaller value is the better one (every other metric: larger is better)."""
GENERATION_METRICS = ("exact_match", "contains")
"""``training.eval_generation``'s comparisons of a generated completion with the reference."""


def task_metrics(task: str, generation: str | None = None) -> tuple[str, ...]:
    """The metrics an evaluation of ``task`` reports (``generation``: the generated-text one too)."""
    found = ("loss", "accuracy", "macro_f1") if task == "sequence_classification" else ("loss", "perplexity")
    return found + ((generation,) if generation else ())


def perplexity(mean_token_loss: float) -> float:
    """``exp`` of the mean loss per target token (``inf`` where that overflows)."""
    try:
        return math.exp(mean_token_loss)
    except OverflowError:
        return math.inf


def confusion_counts(predictions: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """``[classes, classes]`` counts: row = true class, column = predicted class.

    ``predictions`` and ``labels`` are ``[rows]`` class indices; counts of several batches (and
    ranks) add up to the whole set's.
    """
    flat = labels.long() * classes + predictions.long()
    return torch.bincount(flat, minlength=classes * classes).reshape(classes, classes)


def accuracy(confusion: torch.Tensor) -> float:
    """Correct rows over all rows of a confusion matrix."""
    return float(confusion.diagonal().sum()) / max(float(confusion.sum()), 1.0)


def macro_f1(confusion: torch.Tensor) -> float:
    """The unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN).

    A class with no true and no predicted row (its F1 is 0/0) counts as 0, as scikit-learn's
    ``f1_score(average="macro", labels=all classes, zero_division=0)`` does.
    """
    counts = confusion.double()
    true_positive = counts.diagonal()
    denominator = counts.sum(dim=0) + counts.sum(dim=1)  # 2 TP + FP + FN
    f1 = torch.where(denominator > 0, 2 * true_positive / denominator.clamp(min=1), 0.0)
    return float(f1.mean())


def improved(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of ``metric`` beats ``best`` strictly (any value beats none)."""
    if best is None:
        return not math.isnan(value)
    return value < best if metric in LOWER_IS_BETTER else value > best
