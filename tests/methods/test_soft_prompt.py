"""Soft prompts on every family: where the prompt goes, what the caller sees, generation, training."""

from __future__ import annotations

import pytest
import torch

from deltadist import AutoDeltaModel, ConfigError, LoraModel, SoftPromptModel
from tests.methods.test_generate import NEW_TOKENS, _prompts
from tests.checkpoints import reloaded_logits
from tests.snapshot import assert_same_snapshot, snapshot
from tests.tiny import EOS, FAMILIES, PAD, build_tiny, has_head, logits_of, tiny_inputs

PROMPT = {"delta_type": "soft_prompt", "soft_token_num": 3}
HEADS = [(family, head) for family in FAMILIES for head in ("cls", "token", "lm") if has_head(family, head)]
GENERATIVE = ("gpt2", "llama", "qwen2", "mistral", "t5", "bart")
DECODERS = ("gpt2", "llama", "qwen2", "mistral")


def _attach(model, **overrides):
    delta = AutoDeltaModel.from_config({**PROMPT, **overrides}, backbone_model=model)
    with torch.no_grad():  # a prompt far from the initial one, as after training
        for param in delta.delta_parameters().values():
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)))
    return delta


def _labels(family: str, head: str, inputs: dict) -> torch.Tensor:
    if head == "cls":
        return torch.tensor([0, 2])
    if head == "token":
        return torch.randint(0, 3, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(1))
    return inputs["input_ids"]  # causal and masked LM; T5/BART: the decoder's labels


@pytest.mark.parametrize(("family", "head"), HEADS)
def test_the_caller_sees_its_own_length_and_labels_train_as_before(family: str, head: str) -> None:
    model = build_tiny(family, head)
    inputs = tiny_inputs(family)
    base = model(**inputs, output_hidden_states=True)
    before = snapshot(model)
    delta = _attach(model)
    delta.freeze_module()
    model.train()
    out = model(**inputs, labels=_labels(family, head, inputs), output_hidden_states=True)
    assert out.logits.shape == base.logits.shape
    hidden = out.encoder_hidden_states if family in ("t5", "bart") else out.hidden_states
    expected = base.encoder_hidden_states if family in ("t5", "bart") else base.hidden_states
    assert [h.shape for h in hidden] == [h.shape for h in expected]
    assert not torch.allclose(out.logits, base.logits, rtol=1e-3, atol=0), "the prompt changes nothing"
    out.loss.backward()
    ours = {id(p) for p in delta.parameters()}
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (id(param) in ours), name
    prompt = next(p for k, p in delta.delta_parameters().items() if k.endswith("soft_embeds"))
    assert prompt.grad.abs().sum() > 0
    model.eval()
    delta.detach()
    assert_same_snapshot(before, snapshot(model))


def test_sites_are_the_base_model_the_encoder_or_the_vision_embeddings() -> None:
    sites = {family: AutoDeltaModel.from_config(PROMPT, backbone_model=build_tiny(family, "cls")).sites
             for family in ("bert", "llama", "t5", "bart", "vit")}
    assert sites == {"bert": ["bert"], "llama": ["model"], "t5": ["transformer.encoder"],
                     "bart": ["model.encoder"], "vit": ["vit.embeddings"]}


def test_a_right_padded_row_is_classified_as_it_is_alone() -> None:
    """Decoder classifiers pool the last non-pad token: found from input_ids, as without a prompt."""
    model = build_tiny("llama", "cls")
    _attach(model)
    ids = torch.randint(EOS + 1, 100, (1, 5), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([ids, torch.full((1, 3), PAD)], dim=1)
    mask = (padded != PAD).long()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=padded, attention_mask=mask).logits,
                                   model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", DECODERS)
def test_a_left_padded_row_sees_prompt_and_text_as_it_does_alone(family: str) -> None:
    """The prompt goes between the pads and the text, so positions and logits are those of the row alone."""
    model = build_tiny(family, "lm")
    _attach(model)
    batch, mask, alone = _prompts()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() passes them (GPT-2 needs them)
    with torch.no_grad():
        padded = model(input_ids=batch, attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(padded[0, -alone.shape[1]:], model(input_ids=alone).logits[0],
                                   rtol=1e-4, atol=1e-4)


def test_the_prompt_follows_the_class_token_on_vit() -> None:
    model = build_tiny("vit", "cls")
    inputs = tiny_inputs("vit")
    delta = _attach(model)
    seen = {}
    first_layer = next(m for n, m in model.named_modules() if n.endswith(("layers.0", "layer.0")))
    handle = first_layer.register_forward_pre_hook(
        lambda m, args: seen.setdefault("sequence", args[0].detach().clone()))
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    handle.remove()
    prompt = next(iter(delta.delta_parameters().values()))
    torch.testing.assert_close(seen["sequence"][:, 1:4], prompt.expand(2, -1, -1))
    with delta.disabled(), torch.no_grad():
        base = model(**inputs, output_hidden_states=True)
    torch.testing.assert_close(seen["sequence"][:, [0, *range(4, seen["sequence"].shape[1])]],
                               base.hidden_states[0])
    assert out.hidden_states[-1].shape == base.hidden_states[-1].shape


@pytest.mark.parametrize("family", GENERATIVE)
def test_beam_search_gives_the_same_beams_cached_uncached_and_left_padded(family: str) -> None:
    """(Greedy generation with every method, soft prompts included, is in test_generate.py.)"""
    model = build_tiny(family, "lm")
    batch, mask, alone = _prompts()
    ones = torch.ones_like(alone)
    _attach(model)
    beams = [model.generate(input_ids=ids, attention_mask=m, max_new_tokens=NEW_TOKENS, num_beams=3,
                            min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD,
                            use_cache=cache)[:, -NEW_TOKENS:]
             for ids, m, cache in ((alone, ones, True), (alone, ones, False), (batch, mask, True))]
    assert torch.equal(beams[0], beams[1])
    assert torch.equal(beams[2][0], beams[0][0])


def test_token_init_copies_the_first_token_embeddings_and_round_trips(tmp_path) -> None:
    model = build_tiny("bert", "cls")
    delta = SoftPromptModel(model, soft_token_num=4)
    prompt = next(iter(delta.delta_parameters().values()))
    torch.testing.assert_close(prompt, model.get_input_embeddings().weight[:4], rtol=0, atol=0)
    with torch.no_grad():
        prompt.add_(1.0)
    inputs = tiny_inputs("bert")
    tuned = logits_of(model, inputs)
    delta.save_finetuned(tmp_path / "prompt")
    torch.testing.assert_close(reloaded_logits(tmp_path / "prompt"), tuned, rtol=0, atol=0)
    random = SoftPromptModel(build_tiny("bert", "cls"), soft_token_num=4, token_init=False, init_range=0.1)
    values = next(iter(random.delta_parameters().values()))
    assert values.abs().max() <= 0.1 and not torch.equal(values, prompt)


def test_bad_settings_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="modified_modules does not apply"):
        SoftPromptModel(build_tiny("bert", "cls"), modified_modules=["attention"])
    with pytest.raises(ConfigError, match="vocabulary has 100.*token_init=False"):
        SoftPromptModel(build_tiny("bert", "cls"), soft_token_num=101)


@pytest.mark.parametrize("order", [("prompt", "lora"), ("lora", "prompt")])
def test_composes_with_lora_in_any_detach_order(order: tuple[str, str]) -> None:
    model = build_tiny("llama", "lm")
    inputs = tiny_inputs("llama")
    before = snapshot(model)
    base = logits_of(model, inputs)
    deltas = {"prompt": _attach(model), "lora": LoraModel(model, lora_r=2)}
    with torch.no_grad():
        deltas["lora"].delta_parameters()["model.layers.0.self_attn.q_proj.lora.lora_B"].fill_(0.3)
    both = logits_of(model, inputs)
    first, second = order
    deltas[first].detach()
    deltas[first].attach()
    torch.testing.assert_close(logits_of(model, inputs), both, rtol=0, atol=0)
    deltas[first].detach()
    deltas[second].detach()
    torch.testing.assert_close(logits_of(model, inputs), base, rtol=0, atol=0)
    assert_same_snapshot(before, snapshot(model))
