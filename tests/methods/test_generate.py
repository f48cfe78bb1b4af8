"""``generate()`` with every method on every generative family: caches, padding, detach."""

from __future__ import annotations

import pytest
import torch

from deltadist import AutoDeltaModel
from tests.tiny import EOS, METHODS, PAD, build_tiny, skip_unsupported

FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "t5", "bart")
NEW_TOKENS = 6
CASES = [(family, method) for family in FAMILIES for method in METHODS]


def _prompts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of two prompts, the first left-padded by 3, and that first prompt alone."""
    generator = torch.Generator().manual_seed(5)
    long = torch.randint(EOS + 1, 100, (1, 7), generator=generator)
    short = torch.randint(EOS + 1, 100, (1, 4), generator=generator)
    batch = torch.cat([torch.cat([torch.full((1, 3), PAD), short], dim=1), long])
    mask = (batch != PAD).long()
    mask[1] = 1
    return batch, mask, short


def _generate(model, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool = True) -> torch.Tensor:
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, forced_eos_token_id=None, do_sample=False,
                         use_cache=use_cache, pad_token_id=PAD)
    return out[:, -NEW_TOKENS:]


@torch.no_grad()
def _next_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The logits of the first generated position."""
    if model.config.is_encoder_decoder:
        start = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id)
        return model(input_ids=ids, decoder_input_ids=start).logits[:, -1]
    return model(input_ids=ids).logits[:, -1]


@torch.no_grad()
def _greedy_loop(model, ids: torch.Tensor) -> torch.Tensor:
    """Greedy decoding with plain forward calls, no cache (the reference generate must match)."""
    if model.config.is_encoder_decoder:
        decoded = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id)
        for _ in range(NEW_TOKENS):
            logits = model(input_ids=ids, decoder_input_ids=decoded, use_cache=False).logits[:, -1]
            logits[:, EOS] = -float("inf")  # as min_new_tokens does
            decoded = torch.cat([decoded, logits.argmax(-1, keepdim=True)], dim=1)
        return decoded[:, 1:]
    tokens = ids
    for _ in range(NEW_TOKENS):
        logits = model(input_ids=tokens, use_cache=False).logits[:, -1]
        logits[:, EOS] = -float("inf")
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens[:, -NEW_TOKENS:]


@pytest.mark.parametrize(("family", "method"), CASES)
def test_generation_with_a_delta_is_consistent_and_detach_restores_the_base_tokens(family, method) -> None:
    skip_unsupported(family, method)
    model = build_tiny(family, "lm")
    batch, mask, alone = _prompts()
    base = _generate(model, alone, torch.ones_like(alone))
    base_logits = _next_logits(model, alone)
    delta = AutoDeltaModel.from_config(METHODS[method], backbone_model=model)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in delta.delta_parameters().values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)

    assert not torch.allclose(_next_logits(model, alone), base_logits), "the delta changes nothing"
    cached = _generate(model, alone, torch.ones_like(alone))
    assert torch.equal(cached, _generate(model, alone, torch.ones_like(alone), use_cache=False))
    assert torch.equal(cached, _greedy_loop(model, alone))
    # The left-padded row of a batch generates what it generates alone.
    assert torch.equal(_generate(model, batch, mask)[0], cached[0])
    delta.detach()
    assert torch.equal(_generate(model, alone, torch.ones_like(alone)), base)
