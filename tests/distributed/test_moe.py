"""LoRA on mixture-of-experts fused expert parameters (plus attention's q_proj) on 2 gloo ranks:
DDP, FSDP2 (the experts' 3-D parameters and their LoRA pairs sharded as DTensors, unsharded by the
decoder layer's ``fully_shard`` before the experts module's own pre-hook puts ``W + s B A`` in
place), FSDP1 (``use_orig_params``, one unit per decoder layer: the expert weights are views of
each rank's piece of the flat parameter outside the forward, whole inside) and DeepSpeed ZeRO-3
(every parameter partitioned; with and without DeepSpeed's default ZeRO leaf sparse-MoE blocks: in
a model forward the expert weight is whole when the offset reads it, and the experts module called
by itself has the offset gather it and its LoRA pair, ``Engine.whole``). Each trains 3 SGD
steps on its half of a fixed batch and must save what one process saves on the whole batch; merging
under the engine must land in the sharded weights (the merged expert weight, gathered, is
``W + s B A`` of the trained pair) and give the attached logits; unmerge and merge-and-unload too.

One launch per engine and family (module-scoped fixtures); the recipe lives in ``moe_workers.py``.
ZeRO-3 is one more DeepSpeed launch (~60-90 s on 2 CPU cores), so it is in the slow grid, as
``test_deepspeed.py``'s extra launches.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file

from tests.distributed import moe_workers
from tests.distributed.harness import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5, reason="transformers 4.5x builds experts as modules")]

TOL = {"rtol": 1e-5, "atol": 1e-5}
LAUNCHES = [("ddp", "mixtral"), ("fsdp2", "mixtral"), ("fsdp2", "qwen3_moe"), ("fsdp1", "mixtral"),
            pytest.param(("zero3", "mixtral"), marks=pytest.mark.slow),
            pytest.param(("zero3", "qwen3_moe"), marks=pytest.mark.slow),
            pytest.param(("zero3:noleaf", "mixtral"), marks=pytest.mark.slow)]
"""``zero3``: DeepSpeed's default, the sparse-MoE block a ZeRO leaf module (fetched whole before the
offset's pre-hook); ``zero3:noleaf``: ``leaf_module.classes: []``, DeepSpeed's hooks on the experts
module run after the offset's, which gathers the weight itself (``Engine.whole``)."""


@pytest.fixture(scope="module")
def references() -> dict[str, dict[str, Any]]:
    return {}


def _reference(references: dict, family: str) -> dict[str, Any]:
    if family not in references:
        references[family] = moe_workers.reference(family)
    return references[family]


def _deepspeed_ops() -> None:
    """DeepSpeed's CPU comm op built (or found cached) before the launch, as test_deepspeed does."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    code = "import os; os.environ.setdefault('DS_ACCELERATOR', 'cpu')\n" \
           "from deepspeed.comm.torch import build_shm_op\nbuild_shm_op()\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module", params=LAUNCHES, ids=lambda p: "-".join(p))
def launched(request, tmp_path_factory) -> tuple[str, str, list[dict]]:
    engine, family = request.param
    workdir = str(tmp_path_factory.mktemp(f"{engine}-{family}"))
    if engine.startswith("zero3"):
        _deepspeed_ops()
        ranks = run_ranks(moe_workers.zero3, timeout=400, args=(family, workdir, engine == "zero3"))
    else:
        ranks = run_ranks(moe_workers.torch_engine, timeout=300, args=(engine, family, workdir))
    return engine, family, ranks


def test_training_on_two_ranks_saves_what_one_process_saves(launched, references) -> None:
    engine, family, ranks = launched
    expected = _reference(references, family)
    assert all(rank["engine"] == ("deepspeed" if engine.startswith("zero3") else engine) for rank in ranks)
    if engine == "fsdp2":  # the expert weight and its LoRA pair are sharded DTensors
        assert all(rank["sharded"] == [True, True, True] for rank in ranks)
    if engine == "fsdp1":  # each rank holds a piece of the expert weights (views of its flat shard)
        assert [sum(rank["local_numel"][i] for rank in ranks) for i in (0, 1)] == [4 * 64 * 64, 4 * 64 * 32]
    if engine.startswith("zero3"):
        assert all(rank["partitioned"] for rank in ranks), "the expert weight was not partitioned"
        for rank in ranks:
            # In a model forward DeepSpeed 0.19 has the expert weight whole by the time the offset's
            # pre-hook runs (the leaf: fetched with its block; without it, already fetched ahead).
            assert set(rank["fetched_at_offset"]) == {True}, rank["fetched_at_offset"]
            # The experts module called alone: the leaf's block hook does not run, nor (without the
            # leaf) DeepSpeed's hook on it before ours: the offset gathers it (Engine.whole).
            assert rank["experts_call_fetched"] == [False], rank["experts_call_fetched"]
            torch.testing.assert_close(rank["experts_call"], expected["experts_call"], **TOL)
            # With gradients: inside a leaf block (no DeepSpeed hooks) its LoRA pair is not fetched
            # either, and pieces gathered for the call would be gone by the backward: refused.
            # Without the leaf DeepSpeed's hooks fetch the pair and the backward reaches it.
            if engine == "zero3":
                assert "leaf module" in rank["experts_grad_call"], rank["experts_grad_call"]
            else:
                assert rank["experts_grad_call"] == "ok", rank["experts_grad_call"]
    saved = load_file(str(Path(ranks[0]["path"]) / "delta.safetensors"))
    assert sorted(saved) == sorted(expected["state"])
    assert any(".experts.gate_up_proj." in k for k in saved) and any(".q_proj." in k for k in saved)
    for key, value in expected["state"].items():
        assert not torch.allclose(value, expected["start"][key]), f"{key} did not train: the test cannot fail"
        assert saved[key].shape == value.shape, key  # full logical shapes, not shards
        torch.testing.assert_close(saved[key], value, **TOL, msg=lambda m, k=key: f"{k}: {m}")
    for rank in ranks:  # delta.state_dict() is whole on every rank
        assert all(torch.equal(rank["state"][k], saved[k]) for k in saved)
        torch.testing.assert_close(rank["logits"], expected["logits"], **TOL)


def test_merge_under_the_engine_lands_in_the_sharded_expert_weights(launched, references) -> None:
    _, family, ranks = launched
    expected = _reference(references, family)
    assert not torch.allclose(expected["logits"], expected["base_logits"], **TOL), "the LoRA is a no-op"
    for rank in ranks:
        torch.testing.assert_close(rank["merged_gate_up_0"], expected["merged_gate_up_0"], **TOL)
        for state in ("merged", "unmerged", "unloaded"):
            torch.testing.assert_close(rank[state], rank["logits"], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, s=state: f"{s}: {m}")
        assert rank["delta_modules"] == [], "merge_and_unload left delta modules"
