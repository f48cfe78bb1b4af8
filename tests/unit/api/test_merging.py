"""Merging you can ship: merge/unmerge, merge_and_unload, and exports that cannot lose the backbone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import deltadist
from deltadist import AutoDeltaModel, BitFitModel, ExportError, LoraModel, SiteError
from deltadist.core.delta_module import DeltaModule
from tests.snapshot import assert_same_snapshot, snapshot
from tests.tiny import build_tiny, logits_of, tiny_inputs

TOL = {"rtol": 1e-4, "atol": 1e-5}


def _tune(delta) -> None:
    """Move the delta's own parameters and any kept head away from their starting values."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in delta.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)


def _trained(family: str = "bert", method=LoraModel, **kwargs):
    model = build_tiny(family, "cls")
    delta = method(model, **kwargs)
    delta.freeze_module()
    _tune(delta)
    return model, delta


@pytest.mark.parametrize("family", ["bert", "gpt2"])  # nn.Linear and transformers' Conv1D
def test_merge_matches_the_attached_model_and_unmerge_restores(family: str) -> None:
    model = build_tiny(family, "cls")
    inputs = tiny_inputs(family)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = LoraModel(model, lora_r=4, unfrozen_modules=["deltas"])
    with torch.no_grad():
        for param in delta.parameters():
            param.normal_(0, 0.5)
    tuned = logits_of(model, inputs)
    delta.merge()
    assert not any(isinstance(m, DeltaModule) for m in model.modules())
    torch.testing.assert_close(logits_of(model, inputs), tuned, **TOL)
    with pytest.raises(deltadist.DeltaError, match="unmerge"):
        delta.attach()
    delta.unmerge()
    torch.testing.assert_close(logits_of(model, inputs), tuned, **TOL)
    delta.detach()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6)


def test_merge_and_unload_returns_the_plain_model_that_exports_and_reloads(tmp_path) -> None:
    model = build_tiny("bert", "cls")
    before = snapshot(model)
    inputs = tiny_inputs("bert")
    delta = LoraModel(model, lora_r=4)
    delta.freeze_module()
    _tune(delta)  # LoRA and the classifier head
    tuned = logits_of(model, inputs)

    plain = delta.merge_and_unload()
    assert plain is model
    # No delta children, no forward or state-dict hooks, the flags from before freeze_module.
    assert_same_snapshot(before, snapshot(plain), values=False)
    torch.testing.assert_close(logits_of(plain, inputs), tuned, **TOL)
    plain.save_pretrained(tmp_path / "export")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    torch.testing.assert_close(logits_of(reloaded, inputs), tuned, **TOL)
    with pytest.raises(deltadist.DeltaError, match="merge_and_unload"):
        delta.attach()


def test_save_finetuned_while_merged_loads_onto_the_pretrained_backbone(tmp_path) -> None:
    model, delta = _trained()
    inputs = tiny_inputs("bert")
    tuned = logits_of(model, inputs)
    delta.merge()
    delta.save_finetuned(tmp_path / "delta")
    fresh = build_tiny("bert", "cls")  # the pretrained backbone, unmerged
    AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=fresh)
    torch.testing.assert_close(logits_of(fresh, inputs), tuned, **TOL)


def test_save_pretrained_with_deltas_attached_is_refused_naming_the_ways_out(tmp_path) -> None:
    model, delta = _trained()
    with pytest.raises(ExportError, match=r"merge_and_unload\(\).*save_finetuned.*full_state_dict"):
        model.save_pretrained(tmp_path / "half")
    assert not (tmp_path / "half" / "model.safetensors").exists()
    # Other callers still get the trainable-only state dict that freeze_module asked for.
    assert set(model.state_dict()) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_save_pretrained_after_merge_writes_the_whole_model(tmp_path) -> None:
    model, delta = _trained()
    inputs = tiny_inputs("bert")
    tuned = logits_of(model, inputs)
    delta.merge()
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits_of(reloaded, inputs), tuned, **TOL)


def test_full_state_dict_lets_save_pretrained_write_backbone_and_delta_as_they_are(tmp_path) -> None:
    model, delta = _trained()
    with deltadist.full_state_dict(model):
        model.save_pretrained(tmp_path / "as_is")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "as_is" / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "bert.embeddings.word_embeddings.weight" in keys
    assert set(delta.delta_parameters()) <= keys


def test_bitfit_merges_into_existing_biases_and_refuses_sites_without_one() -> None:
    model, delta = _trained("bert", BitFitModel)
    inputs = tiny_inputs("bert")
    tuned = logits_of(model, inputs)
    delta.merge_and_unload()
    torch.testing.assert_close(logits_of(model, inputs), tuned, **TOL)

    llama, delta = _trained("llama", BitFitModel)  # RMSNorm and q_proj have no bias of their own
    before = snapshot(llama)
    with pytest.raises(SiteError, match="input_layernorm.*no bias"):
        delta.merge()
    assert_same_snapshot(before, snapshot(llama))
