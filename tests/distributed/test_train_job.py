"""``deltadist train`` of a causal LM on 2 gloo ranks, accumulating 2 micro-batches a step, trains the
delta one process trains, and a run resumed from a mid-run checkpoint (each rank's optimizer shard:
DTensors under FSDP2, ZeRO partitions) ends with the delta of the run that was not interrupted.
FSDP2 in the default run; DDP, FSDP1, ZeRO-2 and ZeRO-3 in the slow grid."""

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
from tests.task_jobs import Job, make_job

pytestmark = pytest.mark.distributed

JOB = {"epochs": 1, "batch_size": 8, "micro_batch_size": 2, "save_every": 2, "warmup_steps": 1,
       "scheduler": "cosine"}
"""8 steps of 8 rows: 2 rows a forward, so each rank accumulates 2 micro-batches a step."""


def delta(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "delta" / "delta.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Job:
    job = make_job(tmp_path_factory.mktemp("single"), "causal_lm", **JOB)
    assert main(["train", "--config", str(job.config)]) == 0
    return job


REPO = Path(__file__).resolve().parents[2]
SLOW = pytest.mark.slow


@pytest.mark.parametrize("engine", ["fsdp2", *(pytest.param(e, marks=SLOW)
                                               for e in ("ddp", "fsdp1", "zero2", "zero3"))])
def test_two_ranks_train_and_resume_the_single_process_delta(engine: str, single: Job,
                                                             tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [f"engine={engine}", f"output_dir={run_dir}"]
    if engine.startswith("zero"):
        overrides = ["engine=deepspeed", f"output_dir={run_dir}",
                     f"deepspeed_config={REPO / 'configs' / 'deepspeed' / engine}.json"]
    metrics = run_ranks(train_on_rank, args=(str(single.config), overrides, False), timeout=400)[0]
    expected = json.loads((single.root / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == expected["steps"] == 8
    assert metrics["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-4)
    assert metrics["tokens"] == expected["tokens"]
    trained = delta(run_dir)
    for name, tensor in delta(single.root / "run").items():
        torch.testing.assert_close(trained[name], tensor, rtol=1e-4, atol=1e-6)

    # Back to the checkpoint after step 4, as if the job had been killed during step 5.
    for step, directory in run_state.checkpoints(run_dir):
        if step > 4:
            shutil.rmtree(directory)
    shutil.rmtree(run_dir / "delta")
    assert sorted(p.name for p in run_state.checkpoints(run_dir)[-1][1].iterdir()) == [
        "delta", "rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors", "run_state.json"]
    resumed = run_ranks(train_on_rank, args=(str(single.config), overrides, True), timeout=400)[0]
    assert resumed["resumed_from"] == 4 and resumed["eval_loss"] == pytest.approx(metrics["eval_loss"])
    for name, tensor in trained.items():
        torch.testing.assert_close(delta(run_dir)[name], tensor, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("engine", ["fsdp2", pytest.param("ddp", marks=SLOW)])
def test_two_ranks_train_the_single_process_delta_on_an_nf4_backbone(engine: str, tmp_path: Path) -> None:
    """``model.quantize: nf4``: FSDP2 shards the 4-bit weights, DDP replicates them."""
    pytest.importorskip("torchao")
    job = make_job(tmp_path / "job", "causal_lm", model_config={"hidden_size": 256, "intermediate_size": 512},
                   **{**JOB, "save_every": None})
    single = ["model.quantize=nf4", f"output_dir={tmp_path / 'single'}"]
    assert main(["train", "--config", str(job.config), *[a for o in single for a in ("--set", o)]]) == 0
    overrides = ["model.quantize=nf4", f"engine={engine}", f"output_dir={tmp_path / 'ranks'}"]
    metrics = run_ranks(train_on_rank, args=(str(job.config), overrides, False), timeout=400)[0]
    expected = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-4)
    # Sharded sums run in another order; Adam's normalised steps carry that rounding to a few
    # entries (one of 2,048 moved by 2e-5 in a run): a wrong delta is off by far more.
    for name, tensor in delta(tmp_path / "single").items():
        torch.testing.assert_close(delta(tmp_path / "ranks")[name], tensor, rtol=1e-3, atol=1e-4)
