"""DDP, FSDP2 and FSDP1 on 2 gloo ranks give what one process gives: training, saving, reloading,
resuming into a wrapped model (``load_finetuned``); ``from_finetuned`` and attaching after wrapping
are refused; activation checkpointing works.

Two launches per engine (module-scoped fixtures): one trains and saves (LoRA 3 and 2 steps, BitFit
3 steps), a second, in new ranks, resumes and tries to attach after wrapping. The recipe lives in
``workers.py``; the single-process reference runs in the pytest process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltadist import AutoDeltaModel
from tests.distributed import workers
from tests.distributed.harness import run_ranks
from tests.tiny import build_tiny

pytestmark = pytest.mark.distributed

TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def references() -> dict[str, dict]:
    return {method: workers.reference(method) for method in workers.METHODS}


@pytest.fixture(scope="module", params=workers.ENGINES)
def trained(request, tmp_path_factory) -> tuple[str, Path, list[dict]]:
    engine = request.param
    workdir = tmp_path_factory.mktemp(engine)
    # Nine trainings (every method) in one launch: ~60 s alone, several times that on 2 busy cores.
    return engine, workdir, run_ranks(workers.train_and_save, args=(engine, str(workdir)), timeout=500)


@pytest.fixture(scope="module")
def resumed(trained) -> tuple[str, list[dict]]:
    engine, workdir, _ = trained
    return engine, run_ranks(workers.resume_and_refuse, args=(engine, str(workdir)))


def _saved(path: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "delta.safetensors"))


def _assert_same_delta(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                       method: str) -> None:
    assert sorted(actual) == sorted(expected)
    assert all(workers.is_delta_key(key, method) for key in actual), sorted(actual)
    assert any(key.startswith(workers.HEAD) for key in actual), "the task head is saved with the delta"
    for key, value in expected.items():
        assert actual[key].shape == value.shape, key  # full logical shapes, not shards
        torch.testing.assert_close(actual[key], value, **TOL, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("method", workers.METHODS)
def test_training_on_two_ranks_equals_one_process(trained, references, method) -> None:
    engine, _, ranks = trained
    run = ranks[0][f"{method}-3"]
    assert ranks[0][f"engine-{method}"] == engine  # deltadist's engine detection
    saved = _saved(run["path"])
    _assert_same_delta(saved, references[method]["state"], method)
    # delta.state_dict() is the full tensor on every rank, equal to what rank 0 wrote.
    for rank in ranks:
        state = rank[f"{method}-3"]["state"]
        assert sorted(state) == sorted(saved)
        assert all(torch.equal(state[k], saved[k]) for k in saved)


@pytest.mark.parametrize("method", workers.METHODS)
def test_reloading_the_checkpoint_in_one_process_reproduces_the_trained_logits(
        trained, references, method) -> None:
    _, _, ranks = trained
    fresh = build_tiny(workers.FAMILY, "cls", seed=workers.MODEL_SEED)
    # The backbone fingerprint saved by the engine (sampled from shards) must match this model's.
    AutoDeltaModel.from_finetuned(ranks[0][f"{method}-3"]["path"], backbone_model=fresh)
    inputs, _ = workers.batch()
    with torch.no_grad():
        logits = fresh(**inputs).logits
    torch.testing.assert_close(logits, references[method]["logits"], **TOL)


def test_resuming_into_the_wrapped_model_continues_identically(trained, resumed, references) -> None:
    engine, ranks = resumed
    uninterrupted = _saved(trained[2][0]["lora-3"]["path"])
    _assert_same_delta(_saved(ranks[0]["resumed"]["path"]), uninterrupted, "lora")
    _assert_same_delta(_saved(ranks[0]["resumed"]["path"]), references["lora"]["state"], "lora")


def test_from_finetuned_onto_the_wrapped_model_refuses_and_names_load_finetuned(resumed) -> None:
    engine, ranks = resumed
    for rank in ranks:
        tags = ["inner", "wrapper"] if engine == "ddp" else ["inner"]
        assert sorted(rank["from_finetuned"]) == sorted(tags)
        for tag, result in rank["from_finetuned"].items():
            assert result is not None, f"{engine} {tag}: from_finetuned loaded onto a wrapped model"
            assert "load_finetuned(" in result["error"], result["error"]
            assert result["unchanged"], f"{engine} {tag}: the refused load changed the model"


def test_attaching_after_wrapping_is_refused_and_changes_nothing(resumed) -> None:
    engine, ranks = resumed
    for rank in ranks:
        assert rank["refusal"] is not None, f"{engine}: attaching after wrapping was accepted"
        kind, is_engine_error, message = rank["refusal"]
        assert is_engine_error, f"{engine}: {kind}: {message}"
        assert "before" in message and ("wrap" in message or "fully_shard" in message), message
        assert rank["unchanged"]


def test_activation_checkpointing_under_ddp() -> None:
    ranks = run_ranks(workers.grad_checkpointing)
    expected = workers.reference_grads()  # one process, whole batch, no checkpointing
    for rank in ranks:
        for variant in ("non_reentrant", "reentrant"):
            result = rank[variant]
            assert "error" not in result, f"{variant}: {result.get('error')}"
            grads = result["grads"]
            assert sorted(grads) == sorted(expected)
            assert all(g is not None for g in grads.values()), variant
            for key, grad in expected.items():
                torch.testing.assert_close(grads[key], grad, **TOL,
                                           msg=lambda m, k=key: f"{variant} {k}: {m}")
            assert any(grads[k].abs().sum() > 0 for k in grads if k.endswith("lora_B"))
        # Reentrant checkpointing with inputs that need no grad: nothing inside a checkpointed
        # block gets a gradient (the task head, outside the blocks, still does).
        frozen_inputs = rank["reentrant_frozen_inputs"]
        assert "error" not in frozen_inputs, frozen_inputs
        lora = {k: g for k, g in frozen_inputs["grads"].items() if ".lora." in k}
        assert lora and all(g is None for g in lora.values()), sorted(lora)
        assert frozen_inputs["grads"]["score.weight"] is not None


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("engine", workers.ENGINES)
def test_merges_land_in_the_sharded_weights_root_sites_included(engine: str, dora: bool) -> None:
    model, _ = workers.merge_sites_model(dora=dora)
    inputs, _ = workers.batch()
    with torch.no_grad():
        expected = model(**inputs).logits  # one process, LoRA attached
    for rank in run_ranks(workers.merge_roundtrip, args=(engine, dora)):
        for state in ("attached", "merged", "unmerged", "unloaded"):
            torch.testing.assert_close(rank[state], expected, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, s=state: f"{engine} {s}: {m}")
        assert rank["delta_modules"] == []


def test_a_failed_write_on_rank_0_raises_on_every_rank(tmp_path) -> None:
    ranks = run_ranks(workers.failing_save, args=(str(tmp_path),), timeout=120)
    assert "No space left" in ranks[0]["error"]
    assert ranks[1]["error"] and "Rank 0 failed" in ranks[1]["error"] and "No space left" in ranks[1]["error"]


@pytest.mark.parametrize("engine", workers.ENGINES)
def test_a_bf16_backbone_trains_its_fp32_lora_under_each_engine(engine: str) -> None:
    for rank in run_ranks(workers.half_precision_step, args=(engine,)):
        if engine == "fsdp1":  # one dtype per flat parameter: a clear error with the ways out
            assert "FSDP1 needs one parameter dtype" in rank["error"] and "fsdp2" in rank["error"]
            continue
        assert rank["error"] is None, rank["error"]
        assert rank["dtypes"] == ["torch.float32"] and rank["finite"] and rank["moved"]


def test_state_dict_of_an_fsdp1_model_after_freezing_is_whole_and_keeps_the_delta_keys() -> None:
    """FSDP1's root hook needs every parameter in the dict, so the filter stands aside there."""
    for rank in run_ranks(workers.fsdp1_state_dict_keys):
        assert set(rank["delta"]) <= set(rank["keys"])
        assert set(rank["keys"]) >= set(rank["backbone"])


def test_a_shared_compacter_rule_is_saved_once_at_full_shape(trained) -> None:
    _, _, ranks = trained
    saved = _saved(ranks[0]["compacter-3"]["path"])
    rules = [key for key in saved if ".rule." in key or key.startswith("compacter_shared.phm_rule")]
    assert rules == ["compacter_shared.phm_rule.factors.0"] and saved[rules[0]].shape == (4, 4, 4)


@pytest.mark.parametrize(("strategy", "world_size"), [
    ("no_shard", 2), ("shard_grad_op", 2), ("hybrid_shard", 4),
    ("no_shard:outer", 2), ("full_shard:outer", 2),
    pytest.param("shard_grad_op:outer", 2, marks=pytest.mark.slow),
    pytest.param("hybrid_shard:outer", 4, marks=pytest.mark.slow)])
def test_fsdp1_sharding_strategies_save_and_merge_what_one_process_trains(
        strategy: str, world_size: int, references, tmp_path) -> None:
    """Each strategy gathers over its own group (no group at all for NO_SHARD, one replica for
    HYBRID_SHARD), so the checkpoint is the single-process one and merges land in every shard.
    ``:outer``: one unit around the whole model and none inside it (``FSDP(model, ...)``), whose
    handle the engine finds outside the model."""
    ranks = run_ranks(workers.train_save_merge, args=(f"fsdp1:{strategy}", str(tmp_path)),
                      world_size=world_size, timeout=400)
    for method in ("lora", "compacter"):
        assert ranks[0][method]["engine"] == "fsdp1"
        _assert_same_delta(_saved(ranks[0][method]["path"]), references[method]["state"], method)
    assert all(rank["merge_error"] < 1e-5 for rank in ranks), [r["merge_error"] for r in ranks]


def test_fsdp1_without_original_parameters_is_refused_with_the_fix() -> None:
    messages = run_ranks(workers.flat_parameters_refused, timeout=240)
    assert all("use_orig_params=True" in m and "fully_shard" in m for m in messages), messages


@pytest.mark.slow  # two launches of 4 ranks (~30 s each on 2 cores)
@pytest.mark.parametrize("layout", ["hsdp", "submesh"])
def test_fsdp2_on_groups_smaller_than_the_world_loads_saves_merges_and_fingerprints_as_one_process(
        layout: str, references, tmp_path) -> None:
    """World of 4. ``hsdp``: a 2-D mesh, replicas of 2 ranks sharded within each (placements
    ``(Replicate(), Shard(0))``); ``submesh``: two independent 1-D meshes of 2 ranks. Each rank
    finds its rows on its own mesh and sums samples over its shard group only, so backbone loads,
    checkpoints, fingerprints and merges are those of one process."""
    weights = tmp_path / "backbone"
    build_tiny(workers.FAMILY, "cls", seed=workers.MODEL_SEED).save_pretrained(weights)
    ranks = run_ranks(workers.train_save_merge, args=(f"fsdp2:{layout}", str(tmp_path), str(weights)),
                      world_size=4, timeout=400)
    for method in ("lora", "compacter"):
        assert ranks[0][method]["engine"] == "fsdp2"
        _assert_same_delta(_saved(ranks[0][method]["path"]), references[method]["state"], method)

    fresh = build_tiny(workers.FAMILY, "cls", seed=workers.MODEL_SEED)
    AutoDeltaModel.from_finetuned(ranks[0]["lora"]["path"], backbone_model=fresh)  # fingerprint checked
    with torch.no_grad():
        logits = fresh(**workers.batch()[0]).logits
    torch.testing.assert_close(logits, references["lora"]["logits"], **TOL)

    expected = workers.fingerprint(*workers.build("lora"))  # one process
    sites = {key.split(".lora.")[0] + ".weight" for key in references["lora"]["state"] if ".lora." in key}
    sites |= {key for key in references["lora"]["state"] if key.startswith(workers.HEAD)}  # its head copy
    for rank in ranks:
        assert rank["load_error"] < 1e-5, rank["load_error"]  # every shard refilled with its own rows
        assert rank["fingerprint"] == expected
        assert rank["merge_error"] < 1e-5, rank["merge_error"]
        # The merge lands in this rank's shard of every merged weight, and nowhere else.
        assert set(rank["merge_moved"]) == sites, sorted(set(rank["merge_moved"]) ^ sites)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_one_backward_over_a_mixed_batch_trains_two_tasks_as_one_process(engine: str) -> None:
    """Two LoRA deltas, each serving its rows of one batch on each rank: one step trains both, and
    each ends where the single-process multitask run ends."""
    expected = workers.mixed_reference()
    for rank in run_ranks(workers.mixed_ranks, args=(engine,)):
        for task, state in expected.items():
            assert sorted(rank[task]) == sorted(state)
            for key, value in state.items():
                torch.testing.assert_close(rank[task][key], value, **TOL, msg=lambda m, k=key: f"{k}: {m}")
