"""Wrapping for an engine, in one process: the checks that run before any process group."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from deltadist import AutoDeltaModel, ConfigError, LoraModel, prepare_model, wrap_model
from deltadist.engines.wrapping import repeated_blocks
from tests.tiny import METHODS, build_tiny


def test_repeated_blocks_are_the_transformer_layers() -> None:
    model = build_tiny("llama", "cls")
    assert repeated_blocks(model) == list(model.model.layers)


def test_unknown_engine_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="plain, ddp, fsdp2, fsdp1"):
        wrap_model(build_tiny("bert", "cls"), "fsdp3", torch.device("cpu"))


def test_fsdp1_refuses_a_model_with_two_dtypes_naming_the_ways_out() -> None:
    model = build_tiny("llama", "cls").to(torch.bfloat16)
    LoraModel(model, lora_r=2)  # float32 deltas on a bfloat16 backbone (delta_dtype="auto")
    with pytest.raises(ConfigError, match=r"bfloat16 and float32.*fsdp2.*MixedPrecision.*delta_dtype='site'"):
        wrap_model(model, "fsdp1", torch.device("cpu"))


def test_plain_wrapping_returns_the_model_itself() -> None:
    model = build_tiny("bert", "cls")
    assert wrap_model(model, "plain", torch.device("cpu")) is model


@pytest.mark.parametrize("method", list(METHODS))
def test_meta_setup_starts_every_method_where_real_weights_do(method: str, tmp_path) -> None:
    """Seeded alike, ``prepare_model`` and attaching to real weights give the same initial delta."""
    build_tiny("llama", "cls").save_pretrained(tmp_path)
    config = build_tiny("llama", "cls").config
    torch.manual_seed(5)
    real = AutoDeltaModel.from_config(METHODS[method], backbone_model=build_tiny("llama", "cls"))
    prepared = prepare_model(lambda: AutoModelForSequenceClassification.from_config(config),
                             METHODS[method], "plain", tmp_path, delta_seed=5)
    got, want = prepared.delta.state_dict(), real.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
