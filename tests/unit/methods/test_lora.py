"""LoRA's math and its dtype rule: fp32 deltas on half-precision backbones, cast at the site."""

from __future__ import annotations

import pytest
import torch

from deltadist import LoraModel
from tests.tiny import build_tiny, tiny_inputs


def _adamw_steps(model, delta, steps: int = 3) -> torch.Tensor:
    optimizer = torch.optim.AdamW(delta.parameters(), lr=1e-2)
    inputs = tiny_inputs("llama")
    for _ in range(steps):
        optimizer.zero_grad()
        model(**inputs).logits.float().pow(2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_backbone_gets_fp32_deltas_that_train(dtype: torch.dtype) -> None:
    model = build_tiny("llama", "cls", tie_word_embeddings=False).to(dtype)
    delta = LoraModel(model, lora_r=4, unfrozen_modules=["deltas"])
    delta.freeze_module()
    assert {p.dtype for p in delta.parameters()} == {torch.float32}
    logits = _adamw_steps(model, delta)
    assert logits.dtype == dtype  # the backbone still runs in its own dtype
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p).all() for p in delta.parameters())
    assert any(p.abs().sum() > 0 for k, p in delta.delta_parameters().items() if k.endswith("lora_B"))


def test_an_fp16_delta_in_the_sites_dtype_is_nan_after_one_adamw_step() -> None:
    """Why the rule exists: AdamW's eps (1e-8) is 0 in float16."""
    model = build_tiny("llama", "cls").to(torch.float16)
    delta = LoraModel(model, lora_r=4, unfrozen_modules=["deltas"], delta_dtype="site")
    delta.freeze_module()
    assert {p.dtype for p in delta.parameters()} == {torch.float16}  # the option keeps the site's
    _adamw_steps(model, delta, steps=1)
    assert not all(torch.isfinite(p).all() for p in delta.parameters())


@pytest.mark.parametrize(("site", "setting", "expected"), [
    (torch.float32, "auto", torch.float32), (torch.float64, "auto", torch.float64),
    (torch.bfloat16, "auto", torch.float32), (torch.bfloat16, "site", torch.bfloat16),
    (torch.float32, "bfloat16", torch.bfloat16),
])
def test_delta_dtype_setting(site: torch.dtype, setting: str, expected: torch.dtype) -> None:
    model = build_tiny("bert", "cls").to(site)
    delta = LoraModel(model, lora_r=2, delta_dtype=setting, unfrozen_modules=["deltas"])
    assert {p.dtype for p in delta.parameters()} == {expected}


def test_lora_on_a_meta_backbone_stays_on_meta() -> None:
    with torch.device("meta"):
        model = build_tiny("llama", "cls").to(torch.bfloat16)
    delta = LoraModel(model, lora_r=2, unfrozen_modules=["deltas"])
    assert all(p.is_meta and p.dtype == torch.float32 for p in delta.parameters())
