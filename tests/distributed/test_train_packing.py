"""``data.packing`` under plain, DDP and FSDP2: the packed job on 2 gloo ranks (2 micro-batches a
step) trains the delta one process trains, and every engine's run killed after a checkpoint and
resumed ends with the delta of the run that was not interrupted, bit for bit. Slow grid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from deltadist.cli.main import main
from deltadist.training import run_state
from tests.distributed.harness import run_ranks
from tests.distributed.test_train_job import delta
from tests.distributed.train_workers import train_on_rank
from tests.task_jobs import Job, make_job

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

JOB = {"epochs": 2, "batch_size": 8, "micro_batch_size": 2, "save_every": 2, "warmup_steps": 1}
"""64 rows of 9 tokens, 3 to a packed row of 32: 22 rows, 3 steps an epoch, 6 in all."""


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Job:
    job = make_job(tmp_path_factory.mktemp("single"), "causal_lm", **JOB)
    assert main(["train", "--config", str(job.config), "--set", "data.packing=true"]) == 0
    return job


def _train(job: Job, engine: str, run_dir: Path, resume: bool) -> dict:
    """The packed job under ``engine`` (plain: in this process; else on 2 ranks): its metrics."""
    overrides = ["data.packing=true", f"engine={engine}", f"output_dir={run_dir}"]
    if engine != "plain":
        return run_ranks(train_on_rank, args=(str(job.config), overrides, resume), timeout=400)[0]
    args = ["train", "--config", str(job.config), *[a for o in overrides for a in ("--set", o)]]
    assert main(args + (["--resume"] if resume else [])) == 0
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("engine", ["plain", "ddp", "fsdp2"])
def test_packed_job_trains_the_single_process_delta_and_resumes_bit_for_bit(engine: str, single: Job,
                                                                            tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    metrics = _train(single, engine, run_dir, resume=False)
    expected = json.loads((single.root / "run" / "metrics.json").read_text())
    assert metrics["steps"] == expected["steps"] == 6 and metrics["tokens"] == expected["tokens"]
    assert metrics["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-4)
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.05
    trained = delta(run_dir)
    for name, tensor in delta(single.root / "run").items():
        torch.testing.assert_close(trained[name], tensor, rtol=1e-4, atol=1e-6)

    # Back to the checkpoint after step 4, as if the job had been killed during step 5.
    for step, directory in run_state.checkpoints(run_dir):
        if step > 4:
            shutil.rmtree(directory)
    shutil.rmtree(run_dir / "delta")
    resumed = _train(single, engine, run_dir, resume=True)
    assert resumed["resumed_from"] == 4 and resumed["eval_loss"] == metrics["eval_loss"]
    for name, tensor in trained.items():
        assert torch.equal(delta(run_dir)[name], tensor), name
