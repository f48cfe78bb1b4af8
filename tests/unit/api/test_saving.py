"""Saving and loading through the delta object: the resume rule, owners, dtype copies, failures."""

from __future__ import annotations

import pytest
import torch

from deltadist import AutoDeltaModel, BackboneMismatchError, ConfigError, LoraModel
from tests.snapshot import assert_same_snapshot, snapshot
from tests.tiny import build_tiny, logits_of, tiny_inputs


def test_from_finetuned_never_loads_into_the_delta_already_there(tmp_path) -> None:
    model = build_tiny("bert", "cls")
    first = LoraModel(model, lora_r=4, unfrozen_modules=["deltas"])
    with torch.no_grad():
        for param in first.parameters():
            param.normal_(0, 0.1)
    first.save_finetuned(tmp_path / "a")
    with torch.no_grad():
        for param in first.parameters():
            param.mul_(2)  # A trains on after its save
    trained_a = first.state_dict()
    second = AutoDeltaModel.from_finetuned(tmp_path / "a", backbone_model=model)
    assert second is not first and second.sites == first.sites
    assert any(n.endswith(".lora_1") for n, _ in model.named_modules())  # stacked: deltas compose
    for key, value in first.state_dict().items():
        assert torch.equal(value, trained_a[key]), key  # A's trained values are untouched


def test_a_second_delta_trains_its_own_task_head_beside_the_first(saved) -> None:
    model, delta, directory, tuned = saved  # delta trains (and saved) its own copy of the classifier
    second = AutoDeltaModel.from_finetuned(directory, backbone_model=model)  # a second copy of both
    assert second.config.unfrozen_modules == ["deltas", "classifier"]
    mine, its = dict(delta.named_parameters()), dict(second.named_parameters())
    assert mine["classifier.weight"] is not its["classifier.weight"]
    assert torch.equal(mine["classifier.weight"], its["classifier.weight"])
    with torch.no_grad():
        its["classifier.weight"].add_(1.0)  # training the second's head leaves the first's alone
    assert torch.equal(mine["classifier.weight"], delta.state_dict()["classifier.weight"])
    second.detach()
    assert torch.equal(logits_of(model, tiny_inputs("bert")), tuned)


def test_a_parameter_trained_in_place_has_one_owner() -> None:
    """A bias kept without its module's weight is trained in place (a copy would copy the frozen
    weight): a second delta keeping it would overwrite the first's values, so it is refused."""
    model = build_tiny("bert", "cls")
    LoraModel(model, lora_r=2, unfrozen_modules=["deltas", "classifier.bias"])
    before = snapshot(model)
    with pytest.raises(ConfigError, match="classifier.bias"):
        LoraModel(model, lora_r=2, unfrozen_modules=["deltas", "classifier.bias"])
    assert_same_snapshot(before, snapshot(model))
    other = LoraModel(model, lora_r=2)  # by default a second delta leaves the owned head alone
    assert other.config.unfrozen_modules == ["deltas"]


def test_load_finetuned_loads_into_this_delta(saved) -> None:
    model, delta, directory, tuned = saved
    with torch.no_grad():
        for param in delta.parameters():
            param.zero_()
    delta.load_finetuned(directory)
    assert torch.equal(logits_of(model, tiny_inputs("bert")), tuned)
    other = build_tiny("bert", "cls", seed=3)
    stranger = LoraModel(other, lora_r=4)
    with pytest.raises(Exception, match="check_hash=False"):
        stranger.load_finetuned(directory)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_delta_loads_onto_the_same_checkpoint_in_half_precision(saved, dtype) -> None:
    _, _, directory, tuned = saved
    half = build_tiny("bert", "cls").to(dtype)
    AutoDeltaModel.from_finetuned(directory, backbone_model=half)  # accepted: same checkpoint
    torch.testing.assert_close(logits_of(half, tiny_inputs("bert")).float(), tuned, rtol=0.05, atol=0.05)


def test_weights_one_percent_off_are_refused_naming_the_tensors(saved) -> None:
    _, _, directory, _ = saved
    other = build_tiny("bert", "cls")
    with torch.no_grad():
        other.bert.encoder.layer[1].output.dense.weight.mul_(1.01)
    before = snapshot(other)
    changed = "bert.encoder.layer.1.output.dense.weight"
    with pytest.raises(BackboneMismatchError, match=rf"1 tensors differ: {changed}"):
        AutoDeltaModel.from_finetuned(directory, backbone_model=other)
    assert_same_snapshot(before, snapshot(other))


def test_another_architecture_is_named_as_such(saved) -> None:
    _, _, directory, _ = saved
    deeper = build_tiny("bert", "cls", num_hidden_layers=3)
    with pytest.raises(BackboneMismatchError, match="another architecture"):
        AutoDeltaModel.from_finetuned(directory, backbone_model=deeper)


def test_a_mismatch_names_the_class_the_delta_was_trained_on(tmp_path) -> None:
    """A Llama delta loaded onto BERT says it was trained on a LlamaForCausalLM, not on "another
    BertForSequenceClassification"."""
    llama = build_tiny("llama", "lm")
    delta = LoraModel(llama, modified_modules=["self_attn.q_proj"], lora_r=2)
    delta.save_finetuned(tmp_path / "llama_delta")
    bert = build_tiny("bert", "cls")
    with pytest.raises(BackboneMismatchError, match="trained on a LlamaForCausalLM: this "
                                                    "BertForSequenceClassification is another architecture"):
        AutoDeltaModel.from_finetuned(tmp_path / "llama_delta", backbone_model=bert)
