"""``deltadist train``'s evaluation on 2 gloo ranks reports what one process reports: perplexity,
greedy-generation exact match (FSDP2 and ZeRO-3 generating with ``synced_gpus``), the best
checkpoint, and early stopping that a run resumed after a kill repeats. FSDP2's generation in the
default run; DDP's and ZeRO-3's and the early-stopping resumes in the slow grid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltadist.cli.main import main
from deltadist.training import run_state
from tests.distributed.harness import run_ranks
from tests.distributed.train_workers import train_on_rank
from tests.eval_jobs import generation_job
from tests.task_jobs import Job, make_job

pytestmark = pytest.mark.distributed
SLOW = pytest.mark.slow

GENERATION_JOB = {"max_steps": 2, "batch_size": 8, "micro_batch_size": 2, "lr": 1e-4, "eval_every": 1,
                  "eval_batch_size": 6}
"""Evaluation batches of 6 rows over 10: the last one of 4 rows leaves each rank 2."""
STOPPING_JOB = {"batch_size": 8, "eval_every": 4, "save_every": 2, "best_metric": "macro_f1", "patience": 1}
"""Classification, 24 steps planned: macro-F1 does not improve at step 8, so the job stops there."""


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "delta.safetensors"))


def eval_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_loss" in r]


def assert_same_deltas(found: Path, expected: Path, **tolerance: float) -> None:
    reference = tensors(expected)
    for name, tensor in tensors(found).items():
        torch.testing.assert_close(tensor, reference[name], **tolerance)


REPO = Path(__file__).resolve().parents[2]


def train_ranks(job: Job, run_dir: Path, engine: str, resume: bool = False) -> dict:
    overrides = [f"engine={engine}", f"output_dir={run_dir}"]
    if engine == "zero3":  # parameters partitioned: every rank takes part in each generation step
        overrides = ["engine=deepspeed", f"output_dir={run_dir}",
                     f"deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero3.json'}"]
    return run_ranks(train_on_rank, args=(str(job.config), overrides, resume), timeout=400)[0]


@pytest.fixture(scope="module")
def generating(tmp_path_factory: pytest.TempPathFactory) -> Job:
    job = generation_job(tmp_path_factory.mktemp("generating"), eval_rows=10, **GENERATION_JOB)
    assert main(["train", "--config", str(job.config)]) == 0
    return job


@pytest.mark.parametrize("engine", ["fsdp2", *(pytest.param(e, marks=SLOW) for e in ("ddp", "zero3"))])
def test_two_ranks_report_the_single_process_evaluations(engine: str, generating: Job,
                                                         tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    found = train_ranks(generating, run_dir, engine)
    expected = json.loads((generating.root / "run" / "metrics.json").read_text())
    assert found["world_size"] == 2 and expected["eval_metrics"]["exact_match"] > 0
    assert found["eval_metrics"]["exact_match"] == expected["eval_metrics"]["exact_match"]
    perplexity = expected["eval_metrics"]["perplexity"]
    assert found["eval_metrics"]["perplexity"] == pytest.approx(perplexity, rel=1e-4)
    assert found["best"]["step"] == expected["best"]["step"]
    single_rows = eval_rows(generating.root / "run")
    rows = eval_rows(run_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in single_rows] == [0, 1, 2]
    for row, single in zip(rows, single_rows):
        assert row["eval_exact_match"] == single["eval_exact_match"]
        assert row["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-4)
    assert_same_deltas(run_dir / "best", generating.root / "run" / "best", rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def stopping(tmp_path_factory: pytest.TempPathFactory) -> Job:
    job = make_job(tmp_path_factory.mktemp("stopping"), "sequence_classification", **STOPPING_JOB)
    assert main(["train", "--config", str(job.config)]) == 0
    return job


@SLOW
@pytest.mark.parametrize("engine", ["fsdp2", "ddp"])
def test_two_ranks_stop_early_as_one_process_and_again_after_a_kill(engine: str, stopping: Job,
                                                                     tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    found = train_ranks(stopping, run_dir, engine)
    expected = json.loads((stopping.root / "run" / "metrics.json").read_text())
    assert expected["stopped_early"] and expected["steps"] == 8 and expected["best"]["step"] == 4
    for key in ("steps", "stopped_early", "confusion_matrix"):
        assert found[key] == expected[key], key
    assert found["best"]["step"] == expected["best"]["step"]
    assert found["eval_metrics"]["macro_f1"] == pytest.approx(expected["eval_metrics"]["macro_f1"])
    final = {name: t.clone() for name, t in tensors(run_dir / "delta").items()}
    # Killed during step 3: back to the checkpoint of step 2, before the best delta was written.
    for step, directory in run_state.checkpoints(run_dir):
        if step > 2:
            shutil.rmtree(directory)
    shutil.rmtree(run_dir / "delta")
    shutil.rmtree(run_dir / "best")
    resumed = train_ranks(stopping, run_dir, engine, resume=True)
    assert resumed["resumed_from"] == 2
    assert (resumed["steps"], resumed["stopped_early"], resumed["best"]) == (8, True, found["best"])
    for name, tensor in tensors(run_dir / "delta").items():
        torch.testing.assert_close(tensor, final[name], rtol=1e-6, atol=1e-7)
    assert_same_deltas(run_dir / "best", dict(run_state.checkpoints(run_dir))[4] / "delta", rtol=0, atol=0)
