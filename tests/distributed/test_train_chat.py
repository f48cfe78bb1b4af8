"""A chat fine-tune (``messages`` and ShareGPT rows, loss on assistant turns) on 2 gloo ranks trains
the delta one process trains, resumes after a kill to the uninterrupted run's delta, and takes the
steps and tokens ``--dry-run --world-size 2`` planned for it. DDP and FSDP2, in the slow grid (the
single-process chat job is tested in tests/unit/training/test_chat_data.py)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltadist.cli.main import main
from deltadist.training import run_state
from deltadist.training.config import load_config
from deltadist.training.dry_run import dry_run
from tests.distributed.harness import run_ranks
from tests.distributed.train_workers import train_on_rank
from tests.task_jobs import Job, make_job

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

JOB = {"epochs": 1, "batch_size": 8, "micro_batch_size": 2, "save_every": 2, "warmup_steps": 1,
       "scheduler": "cosine"}
"""8 steps of 8 conversations, each rank accumulating 2 micro-batches of 2 a step."""


def delta(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "delta" / "delta.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Job:
    job = make_job(tmp_path_factory.mktemp("chat"), "causal_lm", chat=True, **JOB)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--config", str(job.config)]) == 0
    return job


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_ranks_train_resume_and_match_the_dry_run_on_chat_rows(engine: str, single: Job,
                                                                  tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [f"engine={engine}", f"output_dir={run_dir}"]
    planned = dry_run(load_config(single.config, overrides), world_size=2)
    assert planned.plan.accumulation == 2 and planned.plan.micro_batch_size == 2

    metrics = run_ranks(train_on_rank, args=(str(single.config), overrides, False), timeout=400)[0]
    expected = json.loads((single.root / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == expected["steps"] == planned.plan.total_steps
    # Every training token is trained on once in the single epoch: the dry run counted them all.
    assert metrics["tokens"] == expected["tokens"] == planned.tokens[0]
    assert metrics["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-4)
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    trained = delta(run_dir)
    for name, tensor in delta(single.root / "run").items():
        torch.testing.assert_close(trained[name], tensor, rtol=1e-4, atol=1e-6)

    # Back to the checkpoint after step 4, as if the job had been killed during step 5.
    for step, directory in run_state.checkpoints(run_dir):
        if step > 4:
            shutil.rmtree(directory)
    shutil.rmtree(run_dir / "delta")
    resumed = run_ranks(train_on_rank, args=(str(single.config), overrides, True), timeout=400)[0]
    assert resumed["resumed_from"] == 4 and resumed["eval_loss"] == pytest.approx(metrics["eval_loss"])
    for name, tensor in trained.items():
        torch.testing.assert_close(delta(run_dir)[name], tensor, rtol=0, atol=0)
