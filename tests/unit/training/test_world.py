"""The world-size checks of ``deltadist train`` and the engine setup on explicit launch
environments (a world of one uses an in-process store). No process is started; the split of
global batches over ranks is tested in ``test_batching.py``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from deltadist.engines import setup_engine
from deltadist.engines.runtime import EngineSetup, launch_info
from deltadist.errors import ConfigError
from deltadist.training import loop
from deltadist.training.config import load_config


def test_the_loop_checks_the_batch_size_before_loading_and_always_closes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    closed = []
    setup = EngineSetup(name="ddp", device=torch.device("cpu"), wrap=lambda m: m, rank=1,
                        world_size=2, close=lambda: closed.append(True))
    monkeypatch.setattr(loop, "setup_engine", lambda name, **options: setup)
    monkeypatch.setattr(loop, "load_rows", lambda *a, **k: pytest.fail("loaded the data"))
    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ConfigError, match=r"batch_size \(15\) must be divisible by the world size \(2\)"):
        loop.train(load_config(overrides=["training.batch_size=15", "engine=ddp"]))
    assert closed == [True]


# -- launch environments ----------------------------------------------------------------------
TORCHRUN_RANK1 = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}


def test_launch_info_reads_torchrun_variables() -> None:
    assert launch_info({}) is None
    info = launch_info(TORCHRUN_RANK1)
    assert (info.rank, info.world_size, info.local_rank) == (1, 2, 1)


@pytest.mark.parametrize("env", [
    {"WORLD_SIZE": "2"},
    {"WORLD_SIZE": "2", "RANK": "x", "LOCAL_RANK": "0"},
    {"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"},
])
def test_malformed_launch_variables_are_errors(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="RANK"):
        launch_info(env)


def test_plain_engine_refuses_a_world_of_several_ranks() -> None:
    with pytest.raises(ConfigError, match="engine: plain runs in one process, but this is rank 1 of a "
                                          "world of 2.*engine=ddp, fsdp2 or fsdp1"):
        setup_engine("plain", TORCHRUN_RANK1)
    one = setup_engine("plain", {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert (one.rank, one.world_size, one.is_main) == (0, 1, True)


def test_unknown_engine_lists_all_engines() -> None:
    with pytest.raises(ConfigError, match="available engines: plain, ddp, fsdp2, fsdp1, deepspeed, bmtrain"):
        setup_engine("megatron")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_distributed_engine_without_torchrun_is_a_world_of_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert not dist.is_initialized()
    setup = setup_engine("fsdp2", {})
    try:
        assert dist.is_initialized()
        assert (setup.rank, setup.world_size, setup.is_main) == (0, 1, True)
        assert "running as a world of 1" in capsys.readouterr().err
    finally:
        setup.close()
    assert not dist.is_initialized()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_process_group_started_elsewhere_is_used_and_left_alone() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        setup = setup_engine("ddp", {})
        assert setup.world_size == 1
        setup.close()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_deepspeed_config_is_made_concrete_for_the_job(tmp_path) -> None:
    from deltadist.engines.deepspeed_runtime import resolve_deepspeed_config

    config = resolve_deepspeed_config("configs/deepspeed/zero3.json", batch_size=32, world_size=2)
    assert config["train_batch_size"] == 32 and config["train_micro_batch_size_per_gpu"] == 16
    assert config["gradient_clipping"] == 0.0 and config["zero_optimization"]["stage"] == 3
    assert "\"auto\"" not in json.dumps(config)
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError, match="remove the 'optimizer' section"):
        resolve_deepspeed_config(bad, batch_size=32, world_size=2)
    bad.write_text(json.dumps({"train_batch_size": 8}))
    with pytest.raises(ConfigError, match="train_batch_size is 8.*needs 32"):
        resolve_deepspeed_config(bad, batch_size=32, world_size=2)
    split = resolve_deepspeed_config(None, batch_size=32, world_size=2, max_grad_norm=1.0, micro_batch_size=2)
    assert (split["train_micro_batch_size_per_gpu"], split["gradient_accumulation_steps"]) == (2, 8)
    assert split["gradient_clipping"] == 1.0
