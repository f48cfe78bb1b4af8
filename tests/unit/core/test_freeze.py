"""freeze_module: leaf flags, exclude patterns, trainable-only state dict through hooks."""

from __future__ import annotations

import torch

import deltadist
from deltadist import LoraModel
from tests.tiny import build_tiny


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_default_keeps_the_deltas_and_the_task_head_trainable() -> None:
    model = build_tiny("bert", "cls")
    delta = LoraModel(model, lora_r=2)
    delta.freeze_module()
    head = {"classifier.copy.module.weight", "classifier.copy.module.bias"}  # the delta's own head
    assert _trainable(model) == {n for n, _ in model.named_parameters() if ".lora." in n} | head
    assert {id(p) for p in delta.parameters()} == {id(p) for p in model.parameters() if p.requires_grad}
    # the delta saves its copy under the backbone's names
    assert {"classifier.weight", "classifier.bias"} <= set(dict(delta.named_parameters()))


def test_deltas_only_turns_the_task_head_off() -> None:
    model = build_tiny("bert", "cls")
    delta = LoraModel(model, lora_r=2, unfrozen_modules=["deltas"])
    delta.freeze_module()
    assert _trainable(model) == {n for n, _ in model.named_parameters() if ".lora." in n}


def test_exclude_patterns_select_modules_and_parameter_names() -> None:
    model = build_tiny("bert", "cls")
    delta = LoraModel(model, lora_r=2)
    delta.freeze_module(exclude=["deltas", "classifier", "bias"])
    trainable = _trainable(model)
    assert {"classifier.copy.module.weight", "classifier.copy.module.bias"} <= trainable
    assert "bert.encoder.layer.0.attention.self.query.bias" in trainable
    assert "bert.encoder.layer.0.attention.self.query.weight" not in trainable
    assert "bert.encoder.layer.0.attention.self.query.lora.lora_A" in trainable


def test_unfrozen_modules_from_config_are_saved_with_the_delta() -> None:
    model = build_tiny("bert", "cls")
    delta = LoraModel(model, lora_r=2, unfrozen_modules=["deltas", "classifier"])
    delta.freeze_module()
    assert {"classifier.weight", "classifier.bias"} <= set(dict(delta.named_parameters()))


def test_set_state_dict_keeps_trainable_only_without_reassigning_state_dict() -> None:
    model = build_tiny("bert", "cls")
    delta = LoraModel(model, lora_r=2)
    delta.freeze_module(set_state_dict=True)
    assert "state_dict" not in vars(model)  # never reassigned on the instance
    keys = set(model.state_dict())
    assert keys == _trainable(model)
    with deltadist.full_state_dict(model):
        full = model.state_dict()
    assert set(full) > keys and "bert.embeddings.word_embeddings.weight" in full
    assert set(model.state_dict()) == keys  # filtering is back after the block


def test_trainable_only_state_dict_loads_strictly() -> None:
    model = build_tiny("bert", "cls")
    delta = LoraModel(model, lora_r=2)
    delta.freeze_module()
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    name = sorted(state)[0]
    assert torch.equal(dict(model.named_parameters())[name], state[name])
    del state[name]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        assert name in str(err)  # a missing *trainable* key is still an error
    else:
        raise AssertionError("a missing trainable key must fail a strict load")


def test_set_state_dict_false_leaves_state_dict_whole() -> None:
    model = build_tiny("bert", "cls")
    n_keys = len(model.state_dict())
    LoraModel(model, lora_r=2).freeze_module(set_state_dict=False)
    assert len(model.state_dict()) > n_keys  # all backbone keys plus the new delta keys
