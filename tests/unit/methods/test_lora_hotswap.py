"""Hot swap: ``load_finetuned(path, hotswap=True)`` puts another LoRA's values into an attached one
in place, so a ``torch.compile``d model serves the next task without recompiling (counted with
Dynamo's ``CompileCounter``) and gives what a fresh attach of that LoRA gives."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from deltadist import ConfigError, LoraModel
from tests.tiny import build_tiny, logits_of, tiny_inputs


def _trained(tmp_path, name: str, seed: int, **config) -> torch.Tensor:
    """Save a LoRA with seeded random values; return the logits it gives."""
    model = build_tiny("llama", "lm")
    delta = LoraModel(model, unfrozen_modules=["deltas"], **{"init_lora_weights": False, **config})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in delta.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1 + (1 if param.dim() == 1 else 0))
        logits = logits_of(model, tiny_inputs("llama"))
    delta.save_finetuned(tmp_path / name)
    return logits


@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"init_lora_weights": "pissa"}],
                         ids=["lora", "dora", "pissa"])
def test_a_compiled_model_serves_a_swapped_lora_without_recompiling(tmp_path, variant) -> None:
    first = _trained(tmp_path, "first", 0, lora_r=8, lora_alpha=16, **variant)
    second = _trained(tmp_path, "second", 1, lora_r=4, lora_alpha=32, use_rslora=True, **variant)
    model = build_tiny("llama", "lm")
    delta = LoraModel(model, lora_r=8, lora_alpha=16, unfrozen_modules=["deltas"], **variant)
    delta.load_finetuned(tmp_path / "first")
    # Earlier tests in this process may have used up Dynamo's recompile budget for the model's
    # forward (it then runs eager and nothing is counted): start from empty caches.
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(logits_of(compiled, inputs), first, rtol=1e-5, atol=1e-5)
        compiled_frames = counter.frame_count
        assert compiled_frames > 0
        delta.load_finetuned(tmp_path / "second", hotswap=True)  # rank 4 -> padded to 8, another scale
        torch.testing.assert_close(logits_of(compiled, inputs), second, rtol=1e-5, atol=1e-5)
        delta.load_finetuned(tmp_path / "first", hotswap=True)
        torch.testing.assert_close(logits_of(compiled, inputs), first, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == compiled_frames, "the swap recompiled"


def test_a_swap_that_cannot_take_the_place_is_refused(tmp_path) -> None:
    _trained(tmp_path, "wide", 0, lora_r=16)
    _trained(tmp_path, "dora", 0, lora_r=4, use_dora=True)
    delta = LoraModel(build_tiny("llama", "lm"), lora_r=8)
    with pytest.raises(ConfigError, match="lora_r=8, and the checkpoint has lora_r=16"):
        delta.load_finetuned(tmp_path / "wide", hotswap=True)
    with pytest.raises(ConfigError, match="these differ: use_dora"):
        delta.load_finetuned(tmp_path / "dora", hotswap=True)
