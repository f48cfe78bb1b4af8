"""Splitting global batches over ranks, and the world-size checks of ``deltadist train``.

No process is started: the rank split is checked on a fake tokenizer and a tiny model (the sum of
the ranks' gradients over the world size is the full-batch gradient, as DDP/FSDP average it), and
the engine setup on explicit launch environments (a world of one uses an in-process store).
"""

from __future__ import annotations

import json
import pytest
import torch
import torch.distributed as dist
from torch import nn

from deltadist.errors import ConfigError
from deltadist.training import loop
from deltadist.training.config import load_config
from deltadist.training.data import Batches, Example, check_batch_size, rank_share
from deltadist.engines.runtime import EngineSetup, launch_info, setup_engine

VOCAB = 50


class FakeTokenizer:
    """Word ids from the characters of each word, padded with 0 to the longest text of the call."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        rows = [[sum(map(ord, w)) % (VOCAB - 1) + 1 for w in t.split()][:max_length] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def examples(n: int) -> list[Example]:
    return [Example(" ".join(f"w{i}x{j}" for j in range(1 + i % 5)), i % 4) for i in range(n)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("size", [0, 1, 2, 3, 7, 8, 16, 17])
def test_rank_shares_tile_the_batch_in_rank_order(size: int, world_size: int) -> None:
    shares = [rank_share(size, r, world_size) for r in range(world_size)]
    assert shares[0].start == 0 and shares[-1].stop == size
    assert all(a.stop == b.start for a, b in zip(shares, shares[1:]))
    lengths = [s.stop - s.start for s in shares]
    assert max(lengths) - min(lengths) <= 1
    if size % world_size == 0:
        assert lengths == [size // world_size] * world_size


def test_rank_share_rejects_a_rank_outside_the_world() -> None:
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        rank_share(8, 2, 2)


@pytest.mark.parametrize(("n", "world_size"), [(48, 2), (53, 2), (49, 4), (42, 3)])
def test_ranks_together_see_each_global_batch_once_in_order(n: int, world_size: int) -> None:
    data = examples(n)
    single = list(Batches(data, FakeTokenizer(), 12, 16, generator=torch.Generator().manual_seed(3)))
    per_rank = [list(Batches(data, FakeTokenizer(), 12, 16, generator=torch.Generator().manual_seed(3),
                             rank=r, world_size=world_size)) for r in range(world_size)]
    assert all(len(batches) == len(single) for batches in per_rank)  # every rank: same step count
    for step, full in enumerate(single):
        parts = [batches[step] for batches in per_rank if float(batches[step]["loss_scale"]) > 0]
        for key in ("input_ids", "attention_mask", "labels"):
            # Padding comes from the whole global batch, so the rows are the single-process rows.
            assert torch.equal(torch.cat([p[key] for p in parts]), full[key])


def test_a_rank_with_nothing_left_runs_a_weightless_row() -> None:
    # 13 examples, global batch 12, 4 ranks: the last batch has 1 row, three ranks get none.
    shares = [list(Batches(examples(13), FakeTokenizer(), 12, 16, rank=r, world_size=4))[-1]
              for r in range(4)]
    assert [len(s["labels"]) for s in shares] == [1, 1, 1, 1]
    assert [float(s["loss_scale"]) for s in shares] == [0.0, 0.0, 0.0, 4.0]


@pytest.mark.parametrize(("n", "world_size"), [(24, 1), (24, 2), (29, 2), (25, 4), (26, 3), (13, 4)])
def test_average_of_rank_gradients_is_the_full_batch_gradient(n: int, world_size: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(VOCAB, 8, mode="mean"), nn.Tanh(), nn.Linear(8, 4))

    def grads(batch: dict[str, torch.Tensor], mean: bool) -> list[torch.Tensor]:
        model.zero_grad()
        logits = model(batch["input_ids"])
        if mean:
            loss = nn.functional.cross_entropy(logits, batch["labels"])
        else:  # what the training loop does
            loss = nn.functional.cross_entropy(logits, batch["labels"], reduction="sum") * batch["loss_scale"]
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    data = examples(n)
    full = [grads(b, mean=True) for b in Batches(data, FakeTokenizer(), 12, 16)]
    ranks = [
        [grads(b, mean=False) for b in Batches(data, FakeTokenizer(), 12, 16, rank=r, world_size=world_size)]
        for r in range(world_size)
    ]
    for step, expected in enumerate(full):
        averaged = [sum(ranks[r][step][i] for r in range(world_size)) / world_size
                    for i in range(len(expected))]
        for got, want in zip(averaged, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_global_batch_must_divide_by_the_world_size() -> None:
    check_batch_size(32, 4)
    with pytest.raises(ConfigError, match=r"training.batch_size \(30\) must be divisible by the world "
                                          r"size \(4\).*training.batch_size=28"):
        check_batch_size(30, 4)
    with pytest.raises(ConfigError, match="must be divisible by the world size"):
        Batches(examples(8), FakeTokenizer(), 3, 16, rank=0, world_size=2)


def test_the_loop_checks_the_batch_size_before_loading_and_always_closes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    closed = []
    setup = EngineSetup(name="ddp", device=torch.device("cpu"), wrap=lambda m: m, rank=1,
                        world_size=2, close=lambda: closed.append(True))
    monkeypatch.setattr(loop, "setup_engine", lambda name, **options: setup)
    monkeypatch.setattr(loop, "build_model", lambda *a, **k: pytest.fail("loaded a model"))
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
