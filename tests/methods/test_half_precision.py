"""Every method follows the dtype rule on half-precision backbones: fp32 deltas, cast at the site."""

from __future__ import annotations

import pytest
import torch

from deltadist import AutoDeltaModel
from tests.tiny import METHODS, build_tiny, tiny_inputs

CASES = [(dtype, method) for dtype in (torch.float16, torch.bfloat16) for method in METHODS]


@pytest.mark.parametrize(("dtype", "method"), CASES, ids=[f"{str(d)[6:]}-{m}" for d, m in CASES])
def test_half_backbone_gets_fp32_deltas_that_train_and_reload(dtype, method: str, tmp_path) -> None:
    model = build_tiny("llama", "cls", tie_word_embeddings=False).to(dtype)
    config = {**METHODS[method], "unfrozen_modules": ["deltas"]}
    delta = AutoDeltaModel.from_config(config, backbone_model=model)
    delta.freeze_module()
    assert {p.dtype for p in delta.parameters()} == {torch.float32}
    inputs = tiny_inputs("llama")
    optimizer = torch.optim.AdamW(delta.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(**inputs).logits.float().pow(2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.dtype == dtype  # the backbone still runs in its own dtype
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p).all() for p in delta.parameters())
    delta.save_finetuned(tmp_path / "delta")
    fresh = build_tiny("llama", "cls", tie_word_embeddings=False).to(dtype)
    reloaded = AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=fresh)
    for key, value in delta.delta_parameters().items():
        got = reloaded.delta_parameters()[key]
        assert got.dtype == torch.float32 and torch.equal(got, value), key
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, logits, rtol=0, atol=0)
