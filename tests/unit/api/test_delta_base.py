"""What PEFT users reach for: "all-linear", trainable-parameter counts, ``disabled()``."""

from __future__ import annotations

import pytest
import torch

from deltadist import LoraModel
from deltadist.addressing.linear import is_linear_module
from tests.snapshot import assert_same_snapshot, snapshot
from tests.tiny import build_tiny, logits_of, tiny_inputs


@pytest.mark.parametrize(("family", "head", "left_out"), [
    ("llama", "lm", {"lm_head"}),
    ("llama", "cls", {"score"}),
    ("gpt2", "lm", {"lm_head"}),  # Conv1D layers are linear too
    ("bert", "cls", {"classifier"}),
    ("t5", "lm", {"lm_head"}),
])
def test_all_linear_selects_every_linear_layer_but_the_output_head(family, head, left_out) -> None:
    model = build_tiny(family, head)
    linear = [n for n, m in model.named_modules() if is_linear_module(m)]
    delta = LoraModel(model, modified_modules=["all-linear"], lora_r=2)
    assert delta.sites == [n for n in linear if n not in left_out]
    assert left_out <= set(linear)  # the heads are linear: they were left out on purpose


def test_all_linear_honours_exclude_modules() -> None:
    model = build_tiny("llama", "lm")
    delta = LoraModel(model, modified_modules=["all-linear"], exclude_modules=["mlp"], lora_r=2)
    assert delta.sites and not any(".mlp." in s for s in delta.sites)


def test_trainable_counts_and_print_trainable_parameters(capsys) -> None:
    model = build_tiny("bert", "cls")
    delta = LoraModel(model, lora_r=2)
    delta.freeze_module()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert delta.get_nb_trainable_parameters() == (trainable, total)
    assert trainable == sum(p.numel() for p in delta.parameters())
    delta.print_trainable_parameters()
    assert capsys.readouterr().out == (
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100 * trainable / total:.4f}\n"
    )


def test_disabled_runs_the_base_model_and_restores_the_delta_after() -> None:
    model, inputs = build_tiny("bert", "cls"), tiny_inputs("bert")
    base = logits_of(model, inputs)
    delta = LoraModel(model, lora_r=2)
    delta.freeze_module()
    with torch.no_grad():
        for param in delta.delta_parameters().values():
            param.normal_(0, 0.5)
    tuned = logits_of(model, inputs)
    attached = snapshot(model)
    with delta.disabled():
        assert torch.equal(logits_of(model, inputs), base)
    assert torch.equal(logits_of(model, inputs), tuned)
    assert_same_snapshot(attached, snapshot(model))
    with pytest.raises(ValueError, match="boom"):
        with delta.disabled():
            raise ValueError("boom")
    assert torch.equal(logits_of(model, inputs), tuned)  # back after an error too
