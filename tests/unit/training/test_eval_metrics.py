"""The evaluation's metrics (macro-F1, confusion matrix, perplexity, which value is better), the best
evaluation's tracking with early stopping, a generation row's prompt and reference, and the
evaluation keys' checks."""

from __future__ import annotations

import math

import pytest
import torch
from rich.console import Console

from deltadist.errors import ConfigError
from deltadist.training.best import BestTracker
from deltadist.training.config import from_dict
from deltadist.training.eval_metrics import accuracy, confusion_counts, improved, macro_f1, perplexity
from deltadist.training.evaluation import Evaluation
from deltadist.training.generation_eval import matches, split_reference
from deltadist.training.metrics import Metrics
from deltadist.training.report import print_summary
from deltadist.training.text_data import IGNORE_INDEX, TokenizedExample


def test_a_hand_checked_confusion_matrix_accuracy_and_macro_f1() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 0])
    confusion = confusion_counts(predicted, labels, 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert accuracy(confusion) == pytest.approx(4 / 6)
    # F1 per class: 2TP / (2TP + FP + FN) = 2/4, 4/5, 2/3.
    assert macro_f1(confusion) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_a_class_never_true_nor_predicted_counts_as_f1_zero() -> None:
    confusion = confusion_counts(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]), 3)
    assert macro_f1(confusion) == pytest.approx(2 / 3)
    assert accuracy(confusion) == 1.0


def per_row_macro_f1(predicted: list[int], labels: list[int], classes: int) -> float:
    scores = []
    for c in range(classes):
        tp = sum(p == c and t == c for p, t in zip(predicted, labels))
        fp = sum(p == c and t != c for p, t in zip(predicted, labels))
        fn = sum(p != c and t == c for p, t in zip(predicted, labels))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / classes


def test_counts_of_batches_add_up_to_the_per_row_metrics() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (97,), generator=generator)
    predicted = torch.where(torch.rand(97, generator=generator) < 0.6, labels,
                            torch.randint(0, 4, (97,), generator=generator))
    summed = sum(confusion_counts(predicted[i:i + 10], labels[i:i + 10], 4) for i in range(0, 97, 10))
    assert torch.equal(summed, confusion_counts(predicted, labels, 4))
    assert accuracy(summed) == pytest.approx(float((predicted == labels).float().mean()))
    assert macro_f1(summed) == pytest.approx(per_row_macro_f1(predicted.tolist(), labels.tolist(), 4))
    metrics = pytest.importorskip("sklearn.metrics")
    assert macro_f1(summed) == pytest.approx(metrics.f1_score(labels, predicted, average="macro"))
    assert summed.tolist() == metrics.confusion_matrix(labels, predicted, labels=range(4)).tolist()


def test_perplexity_is_exp_of_the_mean_token_loss_and_inf_past_overflow() -> None:
    assert perplexity(math.log(7.5)) == pytest.approx(7.5)
    assert perplexity(1e4) == math.inf


def test_lower_loss_and_perplexity_higher_other_metrics_are_better() -> None:
    assert improved("loss", 0.5, 0.6) and not improved("loss", 0.6, 0.6)
    assert improved("perplexity", 2.0, 3.0) and not improved("perplexity", 3.5, 3.0)
    assert improved("macro_f1", 0.7, 0.6) and not improved("exact_match", 0.5, 0.5)
    assert improved("accuracy", 0.0, None) and not improved("loss", math.nan, None)


def evaluation(loss: float) -> Evaluation:
    return Evaluation(loss, None, perplexity=math.exp(loss))


def test_the_tracker_keeps_the_best_and_stops_after_patience_evaluations_without_one() -> None:
    tracker = BestTracker("perplexity", patience=2)
    news = [tracker.observe(step, evaluation(loss))
            for step, loss in [(2, 1.0), (4, 0.8), (6, 0.9), (8, 0.8)]]
    assert news == [True, True, False, False] and (tracker.step, tracker.since_best) == (4, 2)
    assert tracker.value == pytest.approx(math.exp(0.8)) and tracker.stopped
    assert tracker.log_fields() == {"best_step": 4, "best_perplexity": tracker.value}


def test_a_resumed_tracker_goes_on_as_the_uninterrupted_one() -> None:
    losses = [(2, 1.0), (4, 0.8), (6, 0.9), (8, 0.85), (10, 0.7), (12, 0.75)]
    whole = BestTracker("loss", patience=3)
    first = BestTracker("loss", patience=3)
    for step, loss in losses:
        whole.observe(step, evaluation(loss))
        if step <= 6:
            first.observe(step, evaluation(loss))
    resumed = BestTracker.resumed("loss", 3, first.state())
    for step, loss in losses[3:]:
        resumed.observe(step, evaluation(loss))
    assert resumed == whole and (whole.step, whole.stopped) == (10, False)
    assert not whole.observe(12, evaluation(0.1))  # the final evaluation of a step already seen
    assert BestTracker("loss", None, since_best=50).stopped is False


def test_a_prompt_completion_rows_prompt_and_reference() -> None:
    example = TokenizedExample((2, 10, 11, 12, 13, 3), (IGNORE_INDEX,) * 3 + (12, 13, 3))
    assert split_reference(example) == ([2, 10, 11], [12, 13, 3])


def test_a_chat_rows_reference_is_its_last_assistant_turn() -> None:
    ignored = IGNORE_INDEX
    example = TokenizedExample(tuple(range(10, 20)), (ignored, ignored, 12, 13, ignored, ignored, ignored,
                                                       17, 18, ignored))
    assert split_reference(example) == (list(range(10, 17)), [17, 18])


def test_exact_match_and_contains() -> None:
    assert matches("w1 w2", "w1 w2", "exact_match") and not matches("w1 w2 w3", "w1 w2", "exact_match")
    assert matches("w1 w2 w3", "w1 w2", "contains") and not matches("w1", "w1 w2", "contains")


LM = {"task": "causal_lm", "data": {"train": "t.jsonl", "eval": "e.jsonl"}}


@pytest.mark.parametrize(("raw", "message"), [
    ({"training": {"patience": 2}}, "training.patience counts evaluations"),
    ({**LM, "training": {"eval_every": 2, "best_metric": "accuracy"}}, "best_metric: 'accuracy' is not"),
    ({"training": {"eval_every": 2, "best_metric": "perplexity"}}, "choose one of loss, accuracy, macro_f1"),
    ({**LM, "training": {"best_metric": "exact_match"}}, "choose one of loss, perplexity."),
    ({"training": {"eval_generation": "contains"}}, "applies to task causal_lm only"),
    ({**LM, "training": {"eval_generation": "bleu"}}, "'bleu' is not one of exact_match, contains"),
    ({**LM, "engine": "fsdp1", "training": {"eval_generation": "contains"}}, "not work with engine fsdp1"),
    ({**LM, "data": {"train": "t.jsonl"}, "training": {"eval_generation": "contains"}}, "needs evaluation"),
    ({**LM, "training": {"eval_every": 1, "patience": 0}}, "training.patience must be positive"),
    ({**LM, "training": {"eval_generation": "contains", "eval_max_new_tokens": 0}}, "eval_max_new_tokens"),
])
def test_evaluation_keys_are_checked(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        from_dict(raw)


def test_the_generation_metric_can_be_the_best_metric() -> None:
    cfg = from_dict({**LM, "training": {"eval_every": 2, "eval_generation": "contains",
                                        "best_metric": "contains", "patience": 3}})
    assert (cfg.training.best_metric, cfg.training.patience) == ("contains", 3)


def test_the_summary_shows_the_new_metrics_the_best_and_the_confusion_table() -> None:
    metrics = Metrics(
        task="sequence_classification", steps=8, tokens=100, train_seconds=1.0, total_seconds=2.0,
        tokens_per_second=100.0, eval_loss_before=0.7, eval_loss=0.4, accuracy_before=0.5,
        accuracy_after=0.75, delta_bytes=2048, delta_path="run/delta", trainable_params=10,
        total_params=100, device="cpu", eval_metrics={"loss": 0.4, "accuracy": 0.75, "macro_f1": 0.7333},
        confusion_matrix=[[5, 3], [1, 7]], class_names=["bad", "good"],
        best={"metric": "macro_f1", "value": 0.8, "step": 4, "path": "run/best"}, stopped_early=True)
    console = Console(record=True, width=140)
    print_summary(metrics, "run/metrics.json", console)
    text = console.export_text()
    assert "eval macro f1    │ 73.3%" in text and "best macro f1    │ 80.0% at step 4 (run/best)" in text
    assert "stopped early" in text
    rows = [line.split("│")[1:-1] for line in text.splitlines() if line.startswith("│ bad") or
            line.startswith("│ good")]
    assert [[cell.strip() for cell in row] for row in rows[-2:]] == [["bad", "5", "3"], ["good", "1", "7"]]
