"""Bad input: a clear error naming the problem and the fix, and the backbone exactly as it was."""

from __future__ import annotations

import pytest
from torch import nn

from deltadist import (
    AddressingError, AutoDeltaConfig, AutoDeltaModel, BitFitModel, ConfigError, LoraModel, SiteError,
)
from tests.snapshot import assert_same_snapshot, snapshot
from tests.tiny import build_tiny


def test_pattern_matching_nothing_lists_the_closest_names() -> None:
    model = build_tiny("bert", "cls")
    before = snapshot(model)
    with pytest.raises(AddressingError, match=r"'atention\.quer'.*attention\.self\.query"):
        LoraModel(model, modified_modules=["atention.quer"])
    assert_same_snapshot(before, snapshot(model))


def test_one_bad_pattern_among_good_ones_changes_nothing() -> None:
    model = build_tiny("bert", "cls")
    before = snapshot(model)
    with pytest.raises(AddressingError, match="valeu"):
        LoraModel(model, modified_modules=["query", "valeu"])
    assert_same_snapshot(before, snapshot(model))


def test_method_on_a_module_it_cannot_modify_names_module_and_type() -> None:
    model = build_tiny("bert", "cls")
    before = snapshot(model)
    with pytest.raises(SiteError, match=r"'bert\.embeddings\.LayerNorm' is a LayerNorm"):
        LoraModel(model, modified_modules=["query", "embeddings.LayerNorm"])
    assert_same_snapshot(before, snapshot(model))
    with pytest.raises(SiteError, match="Dropout"):
        BitFitModel(model, modified_modules=["embeddings.dropout"])
    assert_same_snapshot(before, snapshot(model))


def test_lora_on_a_block_suggests_its_linear_children() -> None:
    with pytest.raises(SiteError, match=r"attention\.self\.query"):
        LoraModel(build_tiny("bert", "cls"), modified_modules=["0.attention"])


def test_defaults_on_an_unknown_model_say_to_pass_modified_modules() -> None:
    with pytest.raises(AddressingError, match="modified_modules"):
        LoraModel(nn.Sequential(nn.Embedding(5, 4), nn.Flatten()))


def test_unknown_delta_type_lists_known_ones() -> None:
    known = "adapter, bitfit, compacter, lora, low_rank_adapter, parallel_adapter"
    with pytest.raises(ConfigError, match=rf"Known delta types: {known}"):
        AutoDeltaConfig.from_dict({"delta_type": "lroa"})


def test_unknown_config_key_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"'lora_rank' \(closest: lora_r.*Valid keys:.*lora_alpha"):
        AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_rank": 4})
    with pytest.raises(ConfigError, match="lora_rank"):
        LoraModel(build_tiny("bert", "cls"), lora_rank=4)


@pytest.mark.parametrize(
    ("key", "value"), [("lora_r", 0), ("lora_r", 2.5), ("lora_dropout", 1.5), ("lora_alpha", -1)]
)
def test_bad_values_name_the_field_and_the_value(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"{key}.*{value}"):
        AutoDeltaConfig.from_dict({"delta_type": "lora", key: value})


def test_config_round_trips_through_a_dict() -> None:
    config = AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": 5, "modified_modules": "query"})
    assert config.modified_modules == ["query"]
    assert AutoDeltaConfig.from_dict(config.to_dict()) == config


def test_the_delta_object_is_not_callable_like_a_model() -> None:
    delta = AutoDeltaModel.from_config({"delta_type": "lora"}, backbone_model=build_tiny("bert", "cls"))
    with pytest.raises(TypeError, match="call the backbone model"):
        delta()


def test_excluding_everything_selected_is_an_error_not_an_empty_delta() -> None:
    model = build_tiny("bert", "cls")
    before = snapshot(model)
    with pytest.raises(AddressingError, match="removes every module"):
        LoraModel(model, modified_modules=["query"], exclude_modules=["encoder"])
    assert_same_snapshot(before, snapshot(model))
