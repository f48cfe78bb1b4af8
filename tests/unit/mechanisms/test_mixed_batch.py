"""``mixed_batch``: each row of one batch through its own delta (or none), forward, backward and
``generate``, equal to that row run with only its delta attached."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltadist
from deltadist import AutoDeltaConfig, AutoDeltaModel
from deltadist.errors import DeltaError
from tests.mixed_rows import alone, assert_rows_as_alone
from tests.tiny import METHODS, build_tiny, logits_of, skip_unsupported, tiny_inputs

ROUTED = [m for m in METHODS if m != "soft_prompt"]
TOL = {"rtol": 1e-5, "atol": 1e-5}


def two_deltas(family: str, method: str) -> tuple[nn.Module, list]:
    """A backbone with two deltas of ``method``, moved apart so every row tells them apart."""
    model = build_tiny(family, "lm" if family == "llama" else "cls")
    config = AutoDeltaConfig.from_dict({**METHODS[method], "unfrozen_modules": ["deltas"]})
    deltas = []
    for shift in (0.05, -0.08):
        delta = AutoDeltaModel.from_config(config, backbone_model=model)
        with torch.no_grad():
            for param in delta.parameters():
                param.add_(shift * torch.randn_like(param))
        deltas.append(delta)
    return model, deltas


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
@pytest.mark.parametrize("method", ROUTED)
def test_each_row_gets_what_its_delta_alone_gives_forward_and_backward(family, method) -> None:
    skip_unsupported(family, method)
    model, (first, second) = two_deltas(family, method)
    rows = [first, second, None, first]
    inputs = tiny_inputs(family, batch=len(rows))
    mixed = assert_rows_as_alone(model, [first, second], rows, inputs, **TOL)
    # Outside the block both apply to every row again.
    assert not torch.allclose(logits_of(model, inputs)[2], mixed[2])


@pytest.mark.parametrize("method", ROUTED)
@pytest.mark.parametrize("search", [{}, {"num_beams": 2}, {"num_beams": 2, "num_return_sequences": 2}])
def test_generate_inside_the_block_gives_each_row_its_lone_tokens(method, search) -> None:
    model, (first, second) = two_deltas("llama", method)
    rows = [second, None, first]
    inputs = tiny_inputs("llama", batch=len(rows))
    settings = {"max_new_tokens": 4, "pad_token_id": 0, **search}
    with deltadist.mixed_batch(rows):
        mixed = model.generate(**inputs, **settings)
    repeat = settings.get("num_return_sequences", 1)
    assert mixed.shape[0] == len(rows) * repeat
    for i, chosen in enumerate(rows):
        alone([first, second], chosen)
        lone = model.generate(**{k: v[i:i + 1] for k, v in inputs.items()}, **settings)
        mine = mixed[i * repeat:(i + 1) * repeat]
        # A row that ends early alone is padded (with EOS) in the batch.
        assert torch.equal(mine[:, :lone.shape[1]], lone)
        assert set(mine[:, lone.shape[1]:].unique().tolist()) <= {0, 2}


def test_bad_row_lists_are_clear_errors_and_change_nothing() -> None:
    model, (first, second) = two_deltas("bert", "lora")
    inputs = tiny_inputs("bert", batch=3)
    before = logits_of(model, inputs)
    with pytest.raises(DeltaError, match="listed 2 rows.*batch of 3"):
        with deltadist.mixed_batch([first, second]):
            logits_of(model, inputs)
    with pytest.raises(DeltaError, match="at least one delta"):
        with deltadist.mixed_batch([None, None]):
            pass
    other_model, (other, _) = two_deltas("bert", "lora")
    with pytest.raises(DeltaError, match="attached to another model"):
        with deltadist.mixed_batch([first, other]):
            pass
    second.merge()
    with pytest.raises(DeltaError, match="merged"):
        with deltadist.mixed_batch([first, None]):
            pass
    second.unmerge()
    second.detach()
    with pytest.raises(DeltaError, match="not attached"):
        with deltadist.mixed_batch([second, None]):
            pass
    second.attach()
    torch.testing.assert_close(logits_of(model, inputs), before)


def test_a_prompt_delta_on_the_model_is_refused_naming_it() -> None:
    model, (first, _) = two_deltas("llama", "lora")
    AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(METHODS["soft_prompt"]), backbone_model=model)
    with pytest.raises(DeltaError, match="cannot route"):
        with deltadist.mixed_batch([first, None]):
            pass


def test_lora_deltas_of_different_ranks_and_scales_share_one_grouped_product() -> None:
    """LoRA branches of one site are computed together (ranks padded with zeros)."""
    model = build_tiny("llama", "cls")
    deltas = []
    for r, alpha in ((2, 4.0), (6, 3.0)):
        delta = AutoDeltaModel.from_config({"delta_type": "lora", "lora_r": r, "lora_alpha": alpha,
                                            "unfrozen_modules": ["deltas"]}, backbone_model=model)
        with torch.no_grad():
            for param in delta.parameters():
                param.add_(0.1 * torch.randn_like(param))
        deltas.append(delta)
    rows = [deltas[1], deltas[0], deltas[1]]
    inputs = tiny_inputs("llama", batch=3)
    with deltadist.mixed_batch(rows):
        # the grouped path is the one under test: a delta leads a group (the routing of the block
        # is on the delta modules' call state)
        assert any(att.delta.call_state.group for d in deltas for att in d.record.attachments)
        mixed = logits_of(model, inputs)
    for chosen in deltas:
        alone(deltas, chosen)
        picked = [i for i, r in enumerate(rows) if r is chosen]
        torch.testing.assert_close(mixed[picked], logits_of(model, {k: v[picked] for k, v in inputs.items()}),
                                   **TOL)


def test_deltas_attached_but_not_listed_serve_no_row_even_once_dropped() -> None:
    model, (first, second) = two_deltas("bert", "adapter")
    config = AutoDeltaConfig.from_dict({**METHODS["lora"], "unfrozen_modules": ["deltas"]})
    with torch.no_grad():  # a third delta whose object nobody keeps: its hooks stay attached
        for param in AutoDeltaModel.from_config(config, backbone_model=model).parameters():
            param.add_(0.1)
    inputs = tiny_inputs("bert", batch=2)
    with deltadist.mixed_batch([first, None]):
        mixed = logits_of(model, inputs)
    bare = build_tiny("bert")
    torch.testing.assert_close(mixed[1:], logits_of(bare, {k: v[1:] for k, v in inputs.items()}), **TOL)
    second.detach()
    with deltadist.mixed_batch([first, first]):  # the dropped LoRA still serves no row
        torch.testing.assert_close(logits_of(model, inputs)[:1], mixed[:1], **TOL)


def test_training_with_activation_checkpointing_is_refused_when_the_block_starts() -> None:
    """The recomputation runs in the backward after the block, without the routing: refused, not
    silently every delta on every row. Inference (no grad, or eval mode) still routes."""
    model, (first, _) = two_deltas("llama", "lora")
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(DeltaError, match="activation checkpointing.*gradient_checkpointing_disable"):
        with deltadist.mixed_batch([first, None]):
            pass
    inputs = tiny_inputs("llama", batch=2)
    with torch.no_grad(), deltadist.mixed_batch([first, None]):
        logits_of(model, inputs)
    model.eval()
    with deltadist.mixed_batch([first, None]):
        logits_of(model, inputs)
