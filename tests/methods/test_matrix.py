"""Every method on every family: the table of (family, method) cases through one set of checks."""

from __future__ import annotations

import pytest
import torch

from deltadist import AutoDeltaConfig, AutoDeltaModel, BackboneMismatchError
from tests.snapshot import assert_same_snapshot, snapshot
from tests.tiny import FAMILIES, METHODS, PROMPTS, build_tiny, logits_of, skip_unsupported, tiny_inputs

CASES = [(family, method) for family in FAMILIES for method in METHODS]


def _attach(family: str, method: str, seed: int = 0):
    model = build_tiny(family, "cls", seed=seed)
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(METHODS[method]), backbone_model=model)
    return model, delta


def _randomise(delta) -> None:
    """Move the deltas away from their no-op initialisation, as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in delta.delta_parameters().values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize(("family", "method"), CASES)
def test_default_targets_attach_as_a_no_op(family: str, method: str) -> None:
    skip_unsupported(family, method)
    model = build_tiny(family, "cls")
    inputs = tiny_inputs(family)
    base = logits_of(model, inputs)
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(METHODS[method]), backbone_model=model)
    assert delta.num_parameters() > 0
    # One site per layer, or the one place where the model reads its sequence.
    assert len(delta.sites) >= (1 if method == "soft_prompt" else 2)
    if method in PROMPTS:  # new positions: not a no-op, the same shapes
        assert logits_of(model, inputs).shape == base.shape
        return
    # Fresh LoRA (B = 0), BitFit (zero bias) and adapters (zero up-projection) change nothing.
    torch.testing.assert_close(logits_of(model, inputs), base, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("family", "method"), CASES)
def test_training_step_gives_gradients_to_deltas_only(family: str, method: str) -> None:
    skip_unsupported(family, method)
    model, delta = _attach(family, method)
    delta.freeze_module()
    model.train()
    logits_of(model, tiny_inputs(family)).float().pow(2).mean().backward()
    ours = {id(p) for p in delta.parameters()}
    for name, param in model.named_parameters():
        if id(param) in ours:
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name
    assert any(p.grad.abs().sum() > 0 for p in delta.parameters())


@pytest.mark.parametrize(("family", "method"), CASES)
def test_save_load_detach_attach_round_trip(family: str, method: str, tmp_path) -> None:
    skip_unsupported(family, method)
    inputs = tiny_inputs(family)
    model = build_tiny(family, "cls")
    before = snapshot(model)
    base = logits_of(model, inputs)
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(METHODS[method]), backbone_model=model)
    _randomise(delta)
    tuned = logits_of(model, inputs)
    assert not torch.allclose(tuned, base)
    delta.save_finetuned(tmp_path / "delta")

    delta.detach()
    assert torch.equal(logits_of(model, inputs), base)
    assert_same_snapshot(before, snapshot(model))
    delta.attach()
    assert torch.equal(logits_of(model, inputs), tuned)

    fresh = build_tiny(family, "cls")
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=fresh)
    assert type(loaded) is type(delta)
    assert torch.equal(logits_of(fresh, inputs), tuned)


@pytest.mark.parametrize(("family", "method"), CASES)
def test_a_different_backbone_checkpoint_is_refused(family: str, method: str, tmp_path) -> None:
    skip_unsupported(family, method)
    _, delta = _attach(family, method)
    delta.save_finetuned(tmp_path / "delta")
    other = build_tiny(family, "cls", seed=1)
    before = snapshot(other)
    with pytest.raises(BackboneMismatchError, match="check_hash=False"):
        AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=other)
    assert_same_snapshot(before, snapshot(other))
    AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=other, check_hash=False)
