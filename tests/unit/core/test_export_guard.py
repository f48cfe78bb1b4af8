"""save_pretrained never drops an attached delta without a word, frozen or not."""

from __future__ import annotations

import pytest

import deltadist
from deltadist import AutoDeltaModel, ExportError, LoraModel
from tests.tiny import build_tiny


def test_save_pretrained_of_an_unfrozen_delta_is_refused(tmp_path) -> None:
    model = build_tiny("bert", "cls")
    delta = LoraModel(model, lora_r=2)  # never frozen
    with pytest.raises(ExportError, match=r"delta module 'bert\.encoder\.layer\.0\..*\.lora'.*merge_and_unload"):
        model.save_pretrained(tmp_path / "half")
    assert not (tmp_path / "half" / "model.safetensors").exists()
    delta.save_finetuned(tmp_path / "delta")
    delta.detach()
    model.save_pretrained(tmp_path / "bare")  # detached: the plain backbone exports

    fresh = build_tiny("bert", "cls")
    AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=fresh)  # loaded, not frozen
    with pytest.raises(ExportError):
        fresh.save_pretrained(tmp_path / "loaded")
    with deltadist.full_state_dict(fresh):
        fresh.save_pretrained(tmp_path / "as_is")  # asked for: written as it is
    assert (tmp_path / "as_is" / "model.safetensors").exists()


def test_the_guard_leaves_every_other_state_dict_caller_alone() -> None:
    model = build_tiny("bert", "cls")
    delta = LoraModel(model, lora_r=2)
    assert set(dict(delta.named_parameters())) <= set(model.state_dict())
