"""Prefix tuning: which attentions, their key/value shapes, the reparameterisation, the routing."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import transformers
from torch import nn

from deltadist import LoraModel, PrefixModel, SiteError
from deltadist.mechanisms.attention import routing_problem
from tests.checkpoints import reloaded_logits
from tests.snapshot import assert_same_snapshot, snapshot
from tests.tiny import PREFIX_NEEDS_TRANSFORMERS_5, build_tiny, logits_of, skip_unsupported, tiny_inputs

SMALL = {"prefix_token_num": 3, "embed_dim": 16, "mid_dim": 16}


def _keys_seen(model, inputs) -> dict[str, tuple[int, ...]]:
    """The key shape each attention module's attention function receives, by module class."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen: dict[str, tuple[int, ...]] = {}
    inner = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, query, key, value, mask, **kwargs):
        seen.setdefault(type(module).__name__, tuple(key.shape))
        return inner(module, query, key, value, mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = spy
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = inner
    return seen


def test_grouped_query_prefixes_have_the_key_value_heads_and_the_configs_head_dim() -> None:
    # head_dim 16 is not hidden / heads (32 / 4 = 8): a prefix sized from hidden / heads breaks.
    model = build_tiny("llama", "lm", head_dim=16)
    delta = PrefixModel(model, **SMALL)
    outs = [p for k, p in delta.delta_parameters().items() if k.endswith("out_weight")]
    assert {tuple(p.shape) for p in outs} == {(2 * 2 * 16, 16)}  # keys and values: 2 kv heads x 16
    inputs = tiny_inputs("llama")
    batch, kv_heads, length, head_dim = _keys_seen(model, inputs)["LlamaAttention"]
    assert (kv_heads, length, head_dim) == (2, inputs["input_ids"].shape[1] + 3, 16)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_models_get_prefixes_on_encoder_decoder_and_cross_attention(family: str) -> None:
    skip_unsupported(family, "prefix")
    model = build_tiny(family, "lm")
    delta = PrefixModel(model, **SMALL)
    kinds = {("encoder" if "encoder." in s.replace("encoder_attn", "") else
              "cross" if ("EncDec" in s or "encoder_attn" in s) else "decoder") for s in delta.sites}
    assert kinds == {"encoder", "decoder", "cross"}
    assert len(delta.sites) == 3 * 2  # two layers each
    inputs = tiny_inputs(family)
    seen = _keys_seen(model, inputs)
    assert all(shape[2] == 3 + inputs["input_ids"].shape[1] for shape in seen.values()), seen


def test_reparameterisation_shares_one_first_layer_saved_once_and_trains_everything(tmp_path) -> None:
    model = build_tiny("llama", "cls")
    delta = PrefixModel(model, **SMALL)
    delta.freeze_module()
    keys = list(delta.delta_parameters())
    assert [k for k in keys if k.startswith("prefix_shared.")] == [
        "prefix_shared.wte", "prefix_shared.weight", "prefix_shared.bias"]
    assert not any(".shared." in k for k in keys)
    model(**tiny_inputs("llama"), labels=torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.delta_parameters().values())
    inputs = tiny_inputs("llama")
    tuned = logits_of(model, inputs)
    delta.save_finetuned(tmp_path / "prefix")
    torch.testing.assert_close(reloaded_logits(tmp_path / "prefix", "llama"), tuned, rtol=0, atol=0)


def test_without_reparameterisation_the_prefixes_are_the_parameters() -> None:
    model = build_tiny("gpt2", "lm")
    delta = PrefixModel(model, prefix_token_num=4, reparameterize=False)
    shapes = {k.rsplit(".", 1)[-1]: tuple(p.shape) for k, p in delta.delta_parameters().items()}
    assert shapes == {"key": (4, 32), "value": (4, 32)}


def test_fold_reparameterization_gives_the_same_model_with_plain_prefixes(tmp_path) -> None:
    model = build_tiny("bart", "lm")
    inputs = tiny_inputs("bart")
    delta = PrefixModel(model, **SMALL)
    with pytest.raises(SiteError, match="fold_reparameterization"):
        delta.merge()  # nothing to fold into weights: the error says what to do instead
    delta.freeze_module()
    tuned = logits_of(model, inputs)
    delta.fold_reparameterization()
    assert delta.config.reparameterize is False
    assert not any(k.startswith("prefix_shared") for k in delta.delta_parameters())
    torch.testing.assert_close(logits_of(model, inputs), tuned, rtol=1e-5, atol=1e-6)
    assert all(p.requires_grad for p in delta.parameters())
    delta.save_finetuned(tmp_path / "plain")
    torch.testing.assert_close(reloaded_logits(tmp_path / "plain", "bart", "lm"), tuned, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "t5", "gpt2", "llama"])
def test_eager_and_sdpa_give_the_same_outputs_and_gradients(family: str) -> None:
    skip_unsupported(family, "prefix")
    results = []
    for implementation in ("eager", "sdpa"):
        model = build_tiny(family, "cls", attn_implementation=implementation)
        torch.manual_seed(0)
        delta = PrefixModel(model, **SMALL)
        delta.freeze_module()
        model.train()
        inputs = {**tiny_inputs(family), "attention_mask": torch.tensor([[1] * 8, [0, 0] + [1] * 6])}
        loss = model(**inputs, labels=torch.tensor([0, 2])).loss
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in delta.named_parameters()}))
    (eager_loss, eager_grads), (sdpa_loss, sdpa_grads) = results
    torch.testing.assert_close(sdpa_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for key, grad in eager_grads.items():
        torch.testing.assert_close(sdpa_grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)


def test_a_deep_copy_of_a_prefixed_model_runs_its_own_prefixes() -> None:
    import copy

    model = build_tiny("llama", "lm")
    inputs = tiny_inputs("llama")
    delta = PrefixModel(model, **SMALL)
    tuned = logits_of(model, inputs)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(logits_of(twin, inputs), tuned, rtol=0, atol=0)
    with torch.no_grad():
        for layer in twin.model.layers:
            layer.self_attn.prefix.out_bias.add_(1.0)
    assert not torch.allclose(logits_of(twin, inputs), tuned)
    torch.testing.assert_close(logits_of(model, inputs), tuned, rtol=0, atol=0)  # the original is apart
    with delta.disabled():  # the original's prefixes off: its children are not used behind its back
        assert not torch.allclose(logits_of(model, inputs), tuned)


def test_detach_and_disabled_restore_the_attention_implementation_and_outputs() -> None:
    model = build_tiny("mistral", "lm")
    inputs = tiny_inputs("mistral")
    before = snapshot(model)
    base = logits_of(model, inputs)
    delta = PrefixModel(model, **SMALL)
    assert model.config._attn_implementation == "deltadist_prefix:sdpa"
    tuned = logits_of(model, inputs)
    with delta.disabled():
        assert model.config._attn_implementation == "sdpa"
        torch.testing.assert_close(logits_of(model, inputs), base, rtol=0, atol=0)
    torch.testing.assert_close(logits_of(model, inputs), tuned, rtol=0, atol=0)
    delta.detach()
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits_of(model, inputs), base, rtol=0, atol=0)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("order", [("prefix", "lora"), ("lora", "prefix")])
def test_two_prefixes_and_lora_compose_in_any_detach_order(order) -> None:
    model = build_tiny("qwen2", "lm")
    inputs = tiny_inputs("qwen2")
    base = logits_of(model, inputs)
    deltas = {"prefix": PrefixModel(model, **SMALL), "prefix_2": PrefixModel(model, **SMALL),
              "lora": LoraModel(model, lora_r=2)}
    first, second = (set(map(id, deltas[name].parameters())) for name in ("prefix", "prefix_2"))
    assert first and second and not first & second
    assert hasattr(model.model.layers[0].self_attn, "prefix_1")  # the second one's child
    both = logits_of(model, inputs)
    for name in order:
        deltas[name].detach()
        deltas[name].attach()
    torch.testing.assert_close(logits_of(model, inputs), both, rtol=0, atol=0)
    for delta in deltas.values():
        delta.detach()
    torch.testing.assert_close(logits_of(model, inputs), base, rtol=0, atol=0)
    assert model.config._attn_implementation == "sdpa"


def test_an_attention_outside_the_attention_interface_is_refused_with_the_reason() -> None:
    """What transformers 4.57's BERT, RoBERTa, DistilBERT and T5 attention modules get."""
    source = types.ModuleType("old_modeling")

    class OldAttention(nn.Module):
        config = types.SimpleNamespace(_attn_implementation="sdpa")

    OldAttention.__module__ = source.__name__
    sys.modules[source.__name__] = source
    try:
        assert "without transformers' AttentionInterface" in routing_problem(OldAttention())
    finally:
        del sys.modules[source.__name__]
    flash = build_tiny("llama", "lm")
    flash.config._attn_implementation = "flex_attention"
    with pytest.raises(SiteError, match="set_attn_implementation\\('sdpa'\\)"):
        PrefixModel(flash, **SMALL)


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) >= 5, reason="transformers 4.x behaviour")
@pytest.mark.parametrize("family", PREFIX_NEEDS_TRANSFORMERS_5)
def test_on_transformers_4_families_outside_the_interface_are_refused_unchanged(family: str) -> None:
    model = build_tiny(family, "cls")
    before = snapshot(model)
    with pytest.raises(SiteError, match="AttentionInterface.*upgrade transformers"):
        PrefixModel(model, **SMALL)
    assert_same_snapshot(before, snapshot(model))
