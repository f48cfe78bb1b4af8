"""One notion of trainable: freeze_module, unfrozen_modules, task heads, and their exact undo."""

from __future__ import annotations

import pytest
import torch

import deltadist
from deltadist import AddressingError, AutoDeltaModel, BitFitModel, LoraModel
from tests.snapshot import assert_same_snapshot, snapshot
from tests.tiny import build_tiny, logits_of, tiny_inputs


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _trains_exactly(model, delta) -> bool:
    """The model's trainable parameters are the delta's (its head copies included, which the
    delta names by the backbone's names and the model by where they live)."""
    return {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in delta.parameters()}


def test_what_freeze_module_keeps_trainable_is_optimised_saved_and_restored(tmp_path) -> None:
    model = build_tiny("bert", "cls")
    delta = LoraModel(model, lora_r=2, unfrozen_modules=["deltas"])
    delta.freeze_module(exclude=["deltas", "classifier"])
    assert _trains_exactly(model, delta)
    assert {"classifier.weight", "classifier.bias"} <= set(dict(delta.named_parameters()))
    assert dict(delta.named_parameters())["classifier.weight"] is model.classifier.copy.module.weight
    assert delta.config.unfrozen_modules == ["deltas", "classifier"]
    optimizer = torch.optim.SGD(delta.parameters(), lr=1.0)
    inputs = tiny_inputs("bert")
    logits_of(model, inputs).pow(2).sum().backward()
    optimizer.step()  # trains the delta's copy of the classifier too: it is in delta.parameters()
    tuned = logits_of(model, inputs)
    delta.save_finetuned(tmp_path / "delta")

    fresh = build_tiny("bert", "cls")
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=fresh)
    assert loaded.config.unfrozen_modules == ["deltas", "classifier"]
    assert torch.equal(fresh.classifier.copy.module.weight, model.classifier.copy.module.weight)
    assert torch.equal(logits_of(fresh, inputs), tuned)
    assert torch.equal(fresh.classifier.weight, build_tiny("bert", "cls").classifier.weight)  # untouched


@pytest.mark.parametrize("where", ["unfrozen_modules", "exclude"])
def test_a_pattern_that_keeps_nothing_is_an_error_naming_close_names(where: str) -> None:
    model = build_tiny("bert", "cls")
    if where == "unfrozen_modules":
        before = snapshot(model)
        with pytest.raises(AddressingError, match=r"'clasifier'.*classifier"):
            LoraModel(model, lora_r=2, unfrozen_modules=["deltas", "clasifier"])
        assert_same_snapshot(before, snapshot(model))
        return
    delta = LoraModel(model, lora_r=2)
    before = snapshot(model)
    with pytest.raises(AddressingError, match=r"'clasifier'.*classifier"):
        delta.freeze_module(exclude=["deltas", "clasifier"])
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize(("family", "head", "head_params"), [
    ("bert", "cls", {"classifier.weight", "classifier.bias"}),
    ("gpt2", "cls", {"score.weight"}),
    ("llama", "token", {"score.weight", "score.bias"}),
    ("distilbert", "qa", {"qa_outputs.weight", "qa_outputs.bias"}),
    ("t5", "cls", {"classification_head.dense.weight", "classification_head.dense.bias",
                   "classification_head.out_proj.weight", "classification_head.out_proj.bias"}),
])
def test_a_task_head_is_trained_and_saved_by_default(family: str, head: str, head_params: set[str]) -> None:
    model = build_tiny(family, head)
    delta = LoraModel(model, lora_r=2)
    delta.freeze_module()
    saved = set(dict(delta.named_parameters()))
    assert head_params <= saved and _trains_exactly(model, delta)
    head = head_params.pop().rpartition(".")[0].split(".")[0]  # the head module, as the delta copies it
    assert all(p.requires_grad for p in model.get_submodule(head).copy.parameters())
    own = [p for n, p in model.get_submodule(head).named_parameters() if not n.startswith("copy.")]
    assert own and not any(p.requires_grad for p in own)


def test_deltas_only_turns_the_task_head_off_and_lm_heads_are_never_task_heads() -> None:
    model = build_tiny("bert", "cls")
    delta = LoraModel(model, lora_r=2, unfrozen_modules=["deltas"])
    delta.freeze_module()
    assert not {"classifier.weight", "classifier.bias"} & _trainable(model)
    lm = build_tiny("llama", "lm")
    delta = LoraModel(lm, lora_r=2)
    assert delta.config.unfrozen_modules == ["deltas"]  # lm_head is pretrained, not a task head


def test_freeze_then_detach_restores_the_backbone_exactly() -> None:
    model = build_tiny("bert", "cls")
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # a flag the user set
    before = snapshot(model)
    delta = LoraModel(model, lora_r=2)
    delta.freeze_module()
    assert len(model.state_dict()) < len(before["state_dict_keys"])
    delta.detach()
    # Modules, forward and state-dict hooks, state-dict keys, requires_grad flags: as before.
    assert_same_snapshot(before, snapshot(model))


def test_attach_after_detach_freezes_again() -> None:
    model = build_tiny("bert", "cls")
    delta = LoraModel(model, lora_r=2)
    delta.freeze_module()
    frozen = snapshot(model)
    delta.detach()
    delta.attach()
    assert_same_snapshot(frozen, snapshot(model))


def test_detach_without_reset_state_dict_keeps_the_trainable_only_state_dict() -> None:
    model = build_tiny("bert", "cls")
    user_frozen = "bert.embeddings.word_embeddings.weight"
    model.get_parameter(user_frozen).requires_grad_(False)
    delta = LoraModel(model, lora_r=2)
    delta.freeze_module()
    delta.detach(reset_state_dict=False)  # as OpenDelta: state_dict() stays trainable-only
    assert model._state_dict_hooks and user_frozen not in model.state_dict()
    assert "bert.pooler.dense.weight" in model.state_dict()  # its flag is restored by detach
    delta.attach()
    delta.detach()  # reset_state_dict=True: the whole state dict again
    assert not model._state_dict_hooks and user_frozen in model.state_dict()


def test_freezing_leaves_other_deltas_flags_alone() -> None:
    model = build_tiny("bert", "cls")
    lora = LoraModel(model, lora_r=2)
    lora.freeze_module()
    bitfit = BitFitModel(model, modified_modules=["attention"], unfrozen_modules=["deltas"])
    bitfit.freeze_module()
    assert all(p.requires_grad for p in lora.parameters())
    assert all(p.requires_grad for p in bitfit.parameters())


def test_a_strict_load_of_a_dict_with_backbone_keys_reports_every_missing_key() -> None:
    model = build_tiny("bert", "cls")
    LoraModel(model, lora_r=2).freeze_module()
    with deltadist.full_state_dict(model):
        full = model.state_dict()
    partial = {k: v for k, v in full.items() if "encoder.layer.1." not in k}
    missing = sorted(set(full) - set(partial))
    with pytest.raises(RuntimeError) as err:
        model.load_state_dict(partial, strict=True)
    assert all(key in str(err.value) for key in missing)  # frozen ones included
    # A trainable-only dict (what an engine saves and resumes) still loads strictly.
    result = model.load_state_dict(model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_delta_keys_survive_a_wrapper_that_renames_state_dict_keys() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = build_tiny("llama", "cls")
    delta = LoraModel(model, lora_r=2)
    for i, layer in enumerate(model.model.layers):  # activation checkpointing, as FSDP recipes do
        model.model.layers[i] = checkpoint_wrapper(layer)
    delta.freeze_module()
    keys = set(model.state_dict())
    # the head's copy is listed where it lives in the model; the delta names it by the backbone's name
    expected = {k.replace("score.", "score.copy.module.") for k in dict(delta.named_parameters())}
    assert keys == expected, sorted(keys ^ expected)


def test_detaching_one_of_two_frozen_deltas_leaves_the_others_freezing() -> None:
    """b stays frozen-around after a goes: the backbone does not become trainable again, and the
    state dict stays b's; when b goes too, every flag is back as before either."""
    model = build_tiny("llama", "lm")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    a = LoraModel(model, modified_modules=["q_proj"], lora_r=2, unfrozen_modules=["deltas"])
    a.freeze_module()
    b = LoraModel(model, modified_modules=["v_proj"], lora_r=2, unfrozen_modules=["deltas"])
    b.freeze_module()
    a.detach()
    assert _trainable(model) == set(dict(b.named_parameters()))
    assert set(model.state_dict()) == set(dict(b.named_parameters()))
    b.detach()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
