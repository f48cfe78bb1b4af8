"""``deltadist train``'s evaluation: a classification job's accuracy, macro-F1 and confusion matrix
are those of the predictions of its saved delta, a language model's perplexity is exp(eval loss),
greedy-generation exact match is what calling ``generate`` with the saved delta gives, the best
delta is kept, patience stops the job, and a run resumed after a kill ends as the uninterrupted one."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from deltadist import AutoDeltaModel
from deltadist.cli.main import main
from deltadist.training import run_state
from deltadist.training.config import load_config
from deltadist.training.eval_metrics import accuracy, macro_f1
from deltadist.training.generation_eval import split_reference
from deltadist.training.job_data import load_rows, tokenize
from tests.eval_jobs import completion, generation_job, prompt_ids, read_rows, recomputed_exact_match
from tests.task_jobs import Job, make_job

STOPPING_JOB = {"batch_size": 8, "eval_every": 4, "save_every": 2, "best_metric": "macro_f1", "patience": 1}
"""Classification, 24 steps planned: macro-F1 does not improve at step 8, so the job stops there."""


def run(job: Job, *extra: str) -> dict:
    assert main(["train", "--config", str(job.config), *extra]) == 0
    return json.loads((job.root / "run" / "metrics.json").read_text())


def log_rows(job: Job) -> list[dict]:
    return [json.loads(line) for line in (job.root / "run" / "metrics.jsonl").read_text().splitlines()]


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "delta.safetensors"))


def assert_same(found: Path, expected: Path) -> None:
    reference = tensors(expected)
    for name, tensor in tensors(found).items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)


@pytest.fixture(scope="module")
def stopping(tmp_path_factory: pytest.TempPathFactory) -> tuple[Job, dict]:
    job = make_job(tmp_path_factory.mktemp("stopping"), "sequence_classification", **STOPPING_JOB)
    return job, run(job)


def test_patience_stops_the_job_and_the_best_delta_is_the_one_of_its_step(stopping: tuple[Job, dict]) -> None:
    job, metrics = stopping
    assert (metrics["steps"], metrics["stopped_early"]) == (8, True)
    evals = [r for r in log_rows(job) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert evals[1]["eval_macro_f1"] == evals[2]["eval_macro_f1"] and evals[2]["stopped_early"]
    value = pytest.approx(evals[1]["eval_macro_f1"], abs=1e-6)  # the log rounds to 6 places
    assert metrics["best"] == {"metric": "macro_f1", "value": value, "step": 4,
                               "path": str(job.root / "run" / "best")}
    assert evals[2]["best_step"] == 4 and evals[2]["best_macro_f1"] == evals[1]["eval_macro_f1"]
    checkpoint = dict(run_state.checkpoints(job.root / "run"))
    assert sorted(checkpoint) == [2, 4, 6, 8]
    assert_same(job.root / "run" / "best", checkpoint[4] / "delta")
    assert_same(job.root / "run" / "delta", checkpoint[8] / "delta")


def test_accuracy_macro_f1_and_confusion_are_those_of_the_saved_deltas_predictions(
        stopping: tuple[Job, dict]) -> None:
    job, metrics = stopping
    names = metrics["class_names"]
    model = AutoModelForSequenceClassification.from_pretrained(job.model, num_labels=len(names)).eval()
    AutoDeltaModel.from_finetuned(job.root / "run" / "delta", backbone_model=model)
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    confusion = [[0] * len(names) for _ in names]
    with torch.no_grad():
        for row in read_rows(job.eval):
            inputs = tokenizer(row["text"], return_tensors="pt", truncation=True, max_length=32)
            confusion[names.index(row["label"])][int(model(**inputs).logits.argmax())] += 1
    assert metrics["confusion_matrix"] == confusion
    counts = torch.tensor(confusion)
    assert metrics["eval_metrics"]["accuracy"] == pytest.approx(accuracy(counts)) == metrics["accuracy_after"]
    assert metrics["eval_metrics"]["macro_f1"] == pytest.approx(macro_f1(counts))


@pytest.mark.parametrize("back_to", [2, 8])
def test_a_run_resumed_after_a_kill_keeps_the_best_step_and_stops_at_the_same_step(
        stopping: tuple[Job, dict], back_to: int, tmp_path: Path) -> None:
    """Back to the checkpoint of step 2 (before the best evaluation: no best delta yet) or 8 (the
    step that stopped early)."""
    job, metrics = stopping
    shutil.copytree(job.root / "run", tmp_path / "run")
    config = {**job.config_dict(), "output_dir": str(tmp_path / "run")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    copy = Job(tmp_path, job.model, job.train, job.eval, tmp_path / "job.yaml")
    for step, directory in run_state.checkpoints(tmp_path / "run"):
        if step > back_to:
            shutil.rmtree(directory)
    shutil.rmtree(tmp_path / "run" / "delta")
    if back_to < metrics["best"]["step"]:
        shutil.rmtree(tmp_path / "run" / "best")
    resumed = run(copy, "--resume")
    assert resumed["resumed_from"] == back_to
    for key in ("steps", "stopped_early", "eval_metrics", "confusion_matrix"):
        assert resumed[key] == metrics[key], key
    assert {**resumed["best"], "path": None} == {**metrics["best"], "path": None}
    assert_same(tmp_path / "run" / "delta", job.root / "run" / "delta")
    assert_same(tmp_path / "run" / "best", job.root / "run" / "best")
    assert [r for r in log_rows(copy) if "eval_loss" in r] == [r for r in log_rows(job) if "eval_loss" in r]


@pytest.fixture(scope="module")
def generating(tmp_path_factory: pytest.TempPathFactory) -> tuple[Job, dict]:
    job = generation_job(tmp_path_factory.mktemp("generating"), max_steps=2, lr=1e-4, eval_every=1,
                         save_every=1, best_metric="exact_match", patience=1)
    return job, run(job)


def test_a_language_models_perplexity_is_exp_of_its_eval_loss(generating: tuple[Job, dict]) -> None:
    job, metrics = generating
    assert metrics["eval_metrics"]["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-12)
    for row in (r for r in log_rows(job) if "eval_loss" in r):
        assert row["eval_perplexity"] == pytest.approx(math.exp(row["eval_loss"]), rel=1e-5)


def test_exact_match_is_what_generate_gives_with_the_saved_delta(generating: tuple[Job, dict]) -> None:
    job, metrics = generating
    # patience 1 runs out at the final evaluation (no better exact match at step 2): not early.
    assert (metrics["steps"], metrics["stopped_early"]) == (2, False)
    expected = recomputed_exact_match(job, job.root / "run" / "delta")
    assert expected >= 0.25 and metrics["eval_metrics"]["exact_match"] == expected
    best = metrics["best"]
    scores = {r["step"]: r["eval_exact_match"] for r in log_rows(job) if "eval_loss" in r and r["step"] > 0}
    assert best["value"] == max(scores.values())  # the first evaluation that reached it:
    assert best["step"] == min(step for step, score in scores.items() if score == best["value"])
    checkpoint = dict(run_state.checkpoints(job.root / "run"))[best["step"]]
    assert_same(job.root / "run" / "best", checkpoint / "delta")


def test_chat_rows_generate_from_the_turns_before_the_last_answer(tmp_path: Path) -> None:
    job = generation_job(tmp_path, chat=True, max_steps=1, lr=1e-4)
    metrics = run(job)
    assert metrics["eval_metrics"]["exact_match"] == recomputed_exact_match(job, job.root / "run" / "delta")
    cfg = load_config(job.config)
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    examples = tokenize(load_rows(cfg), cfg, tokenizer).eval
    for example, row in zip(examples, read_rows(job.eval)):
        prompt, reference = split_reference(example)
        assert prompt == prompt_ids(row, tokenizer)  # ends with the generation prompt
        assert tokenizer.decode(reference, skip_special_tokens=True).strip() == completion(row)
