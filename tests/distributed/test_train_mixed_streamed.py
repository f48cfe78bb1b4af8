"""``deltadist train`` on 2 gloo ranks, on several sources mixed by weight (JSON Lines under other
column names, a save_to_disk folder, a dataset in the local datasets cache) or streamed from three
files through a shuffle buffer (each rank reading its own rows): the ranks train on the rows one
process trains on and end with its delta, and a run resumed from a mid-run checkpoint ends with the
delta of the run that was not interrupted. Slow grid: DDP and FSDP2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file

from deltadist.cli.main import main
from deltadist.training import run_state
from tests.distributed.harness import run_ranks
from tests.distributed.train_workers import train_on_rank
from tests.source_jobs import mixed_job, streamed_job

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

JOB = {"batch_size": 8, "micro_batch_size": 2, "save_every": 4, "warmup_steps": 1, "scheduler": "cosine"}
"""16 steps of 8 rows (2 epochs; streamed: max_steps 16, the file read twice), each rank
accumulating 2 micro-batches of 2 rows a step."""


def delta(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "delta" / "delta.safetensors"))


@pytest.mark.parametrize("data", ["mixed", "streamed"])
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_ranks_train_and_resume_the_single_process_delta(
        engine: str, data: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))  # the spawned ranks import datasets afresh
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))  # this process has it already
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if data == "mixed":
        job = mixed_job(tmp_path / "job", cache=cache, epochs=2, **JOB)
    else:
        job = streamed_job(tmp_path / "job", shards=3, shuffle_buffer=8, max_steps=16, **JOB)
    assert main(["train", "--config", str(job.config)]) == 0
    expected = json.loads((job.root / "run" / "metrics.json").read_text())

    run_dir = tmp_path / "ranks"
    overrides = [f"engine={engine}", f"output_dir={run_dir}"]
    metrics = run_ranks(train_on_rank, args=(str(job.config), overrides, False), timeout=400)[0]
    assert metrics["world_size"] == 2 and metrics["steps"] == expected["steps"] == 16
    assert metrics["tokens"] == expected["tokens"]  # the same rows drawn, epoch by epoch
    assert metrics["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-4)
    trained = delta(run_dir)
    for name, tensor in delta(job.root / "run").items():
        torch.testing.assert_close(trained[name], tensor, rtol=1e-4, atol=1e-6)

    # Back to the checkpoint after step 4, mid-way through the first epoch (or pass over the file).
    for step, directory in run_state.checkpoints(run_dir):
        if step > 4:
            shutil.rmtree(directory)
    shutil.rmtree(run_dir / "delta")
    resumed = run_ranks(train_on_rank, args=(str(job.config), overrides, True), timeout=400)[0]
    assert resumed["resumed_from"] == 4
    for name, tensor in trained.items():
        assert torch.equal(delta(run_dir)[name], tensor), name
