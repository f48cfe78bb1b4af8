"""The meta-device setup order (``prepare_model``) gives what the real-weight path gives."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import meta_workers, workers
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.distributed


def _assert_same_paths(both: dict) -> None:
    real, meta = both["real"], both["meta"]
    assert meta["engine"] == real["engine"] != "plain"
    torch.testing.assert_close(meta["logits"], real["logits"], rtol=0, atol=0)
    assert meta["delta"].keys() == real["delta"].keys()
    for key, value in real["delta"].items():
        torch.testing.assert_close(meta["delta"][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "fsdp1"])
def test_meta_setup_equals_real_weights(engine: str, tmp_path) -> None:
    meta_workers._model().save_pretrained(tmp_path)
    _assert_same_paths(run_ranks(meta_workers.both_paths, args=(engine, str(tmp_path)), timeout=300)[0])


@pytest.mark.parametrize("engine", ["fsdp2", "fsdp1"])
def test_every_method_sized_on_meta_and_sharded_equals_real_weights(engine: str, tmp_path) -> None:
    """Adapters (widths from attributes), BitFit and Compacter's shared rule through the meta path."""
    meta_workers._model().save_pretrained(tmp_path)
    deltas = {name: config for name, config in workers.DELTAS.items() if name != "lora"}
    ranks = run_ranks(meta_workers.both_paths_for_each, args=(engine, str(tmp_path), deltas), timeout=400)
    assert ranks[0].keys() == deltas.keys()
    for name, both in ranks[0].items():
        assert both["meta"]["delta"], name
        _assert_same_paths(both)


@pytest.mark.parametrize("engine", ["fsdp2", "fsdp1"])
def test_freezing_after_sharding_trains_the_deltas_only(engine: str) -> None:
    # DDP is not in this list on purpose: it fixes the set of parameters it reduces when it is
    # built, so under DDP freeze before wrapping (docs/engines.md, "The rules").
    ranks = run_ranks(meta_workers.freeze_after_wrapping, args=(engine,), timeout=240)
    result = ranks[0]
    # FSDP1 gives an original parameter a gradient only on the ranks whose shard holds part of it.
    with_grad = sorted(set().union(*(rank["with_grad"] for rank in ranks)))
    assert result["trainable"] == with_grad
    assert with_grad and all(".lora." in n or n.startswith("score.") for n in with_grad)
    assert "score.copy.module.weight" in with_grad  # the delta's own task head, trained by default
    assert all(value.abs().sum() > 0 for key, value in result["delta"].items() if "lora_B" in key)


def test_fsdp2_parameters_listed_after_a_forward_are_the_sharded_ones() -> None:
    result = run_ranks(meta_workers.optimizer_built_after_a_forward, timeout=240)[0]
    assert result["kinds"] == ["DTensor"]
    assert result["class"] == "LlamaForSequenceClassification"
    assert not torch.equal(result["after"]["score.weight"], result["before"]["score.weight"])


@pytest.mark.parametrize("engine", ["fsdp2", "fsdp1"])
def test_meta_setup_fills_tied_embeddings_stored_once(engine: str, tmp_path) -> None:
    from tests.tiny import build_tiny

    build_tiny("llama", "lm", tie_word_embeddings=True).save_pretrained(tmp_path)
    result = run_ranks(meta_workers.tied_lm, args=(engine, str(tmp_path)), timeout=240)[0]
    # A fresh LoRA is a no-op, so the prepared model must be the saved one, tied head included.
    torch.testing.assert_close(result["got"], result["want"], rtol=0, atol=0)
