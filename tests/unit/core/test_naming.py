"""Named deltas: ``delta_name``, ``deltadist.deltas_on``, default names, clashes, checkpoints, ``log()``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import deltadist
from deltadist import AdapterModel, AutoDeltaModel, BitFitModel, ConfigError, LoraModel
from tests.snapshot import assert_same_snapshot, snapshot
from tests.tiny import build_tiny


def test_deltas_on_lists_deltas_by_name_oldest_first() -> None:
    model = build_tiny("bert", "cls")
    french = LoraModel(model, lora_r=2, delta_name="french")
    first, second = LoraModel(model, lora_r=2), BitFitModel(model)
    third = AdapterModel(model, bottleneck_dim=4, delta_name="adapter-en")
    found = deltadist.deltas_on(model)
    assert list(found) == ["french", "lora_0", "bitfit_0", "adapter-en"]
    assert [found[n] for n in found] == [french, first, second, third]
    assert french.name == "french" and first.name == "lora_0" and first.config.delta_name is None
    assert "'french'" in repr(french)


def test_default_names_are_stable_and_detached_deltas_keep_theirs() -> None:
    model = build_tiny("bert", "cls")
    first, second = LoraModel(model, lora_r=2), LoraModel(model, lora_r=2)
    second.detach()  # detached, not unloaded: still on the model, still named
    assert list(deltadist.deltas_on(model)) == ["lora_0", "lora_1"]
    first.merge_and_unload()  # gone for good: its name is free, the others keep theirs
    assert list(deltadist.deltas_on(model)) == ["lora_1"]
    third = LoraModel(model, lora_r=2)
    assert (second.name, third.name) == ("lora_1", "lora_0")
    assert list(deltadist.deltas_on(model)) == ["lora_1", "lora_0"]


def test_a_second_delta_with_a_taken_name_is_refused_and_changes_nothing(tmp_path) -> None:
    model = build_tiny("bert", "cls")
    french = LoraModel(model, lora_r=2, delta_name="french", unfrozen_modules=["deltas"])
    french.save_finetuned(tmp_path)
    unnamed = LoraModel(model, lora_r=2)  # lora_0 (kept alive: a delta object collected is gone)
    before = snapshot(model)
    with pytest.raises(ConfigError, match="already has a delta named 'french'.*Nothing was changed"):
        BitFitModel(model, delta_name="french")
    with pytest.raises(ConfigError, match="already has a delta named 'french'.*from_finetuned takes it"):
        AutoDeltaModel.from_finetuned(tmp_path, backbone_model=model)
    with pytest.raises(ConfigError, match="already has a delta named 'lora_0'"):  # a default name too
        LoraModel(model, lora_r=2, delta_name="lora_0")
    assert_same_snapshot(before, snapshot(model))
    assert list(deltadist.deltas_on(model)) == ["french", "lora_0"]
    copy = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=model, delta_name="french-2")
    assert list(deltadist.deltas_on(model)) == ["french", "lora_0", "french-2"]
    assert copy.config.delta_name == "french-2" and unnamed.name == "lora_0"


def test_the_name_is_saved_and_restored_for_any_method(tmp_path) -> None:
    delta = AdapterModel(build_tiny("bert", "cls"), bottleneck_dim=4, delta_name="german")
    delta.save_finetuned(tmp_path)
    assert json.loads((tmp_path / "delta_config.json").read_text())["delta_name"] == "german"
    model = build_tiny("bert", "cls")
    loaded = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=model)
    assert loaded.name == "german" and deltadist.deltas_on(model) == {"german": loaded}


def test_an_unnamed_checkpoint_gets_a_default_name_where_it_is_loaded(tmp_path) -> None:
    LoraModel(build_tiny("bert", "cls"), lora_r=2).save_finetuned(tmp_path)
    model = build_tiny("bert", "cls")
    first = LoraModel(model, lora_r=2, unfrozen_modules=["deltas"])
    assert AutoDeltaModel.from_finetuned(tmp_path, backbone_model=model).name == "lora_1"
    assert first.name == "lora_0"


def test_log_shows_the_names(capsys) -> None:
    model = build_tiny("bert", "cls")
    unnamed = LoraModel(model, lora_r=2)
    french = LoraModel(model, lora_r=2, delta_name="french")
    text = french.log(visualization=False)
    assert "Delta name" in text and "french" in text
    assert f"other deltas on the model: {unnamed.name} (lora, attached)" in text
    unnamed.detach()  # still on the model (attach() brings it back), and the log says how
    assert f"other deltas on the model: {unnamed.name} (lora, detached)" in french.log(visualization=False)
    assert unnamed.state == "detached" and repr(unnamed).endswith(" parameters, detached)")


@pytest.mark.parametrize("bad", ["", "  ", " french", 3])
def test_bad_names_are_refused(bad) -> None:
    with pytest.raises(ConfigError, match="delta_name must be a non-empty string"):
        LoraModel(build_tiny("bert", "cls"), delta_name=bad)


def test_deltas_on_sees_through_a_wrapper_holding_the_model_as_module() -> None:
    class Wrapper(nn.Module):  # as DistributedDataParallel and a DeepSpeed engine hold it
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    model = build_tiny("bert", "cls")
    delta = LoraModel(model, lora_r=2, delta_name="x")
    assert deltadist.deltas_on(Wrapper(model)) == {"x": delta}
    assert deltadist.deltas_on(build_tiny("bert", "cls")) == {}
    assert deltadist.deltas_on(torch.nn.Linear(2, 2)) == {}


def test_a_delta_acting_on_the_model_stays_listed_until_detached(tmp_path) -> None:
    """from_finetuned's return value dropped: the delta still changes the model, so it stays
    listed and keeps its name; once detached, the model no longer holds it."""
    import gc

    model = build_tiny("bert")
    LoraModel(model, lora_r=2, delta_name="french").save_finetuned(tmp_path / "french")
    deltadist.deltas_on(model)["french"].merge_and_unload()  # a clean backbone again
    AutoDeltaModel.from_finetuned(tmp_path / "french", backbone_model=model)  # not kept
    gc.collect()
    assert list(deltadist.deltas_on(model)) == ["french"]
    with pytest.raises(ConfigError, match="already has a delta named 'french'"):
        LoraModel(model, lora_r=2, delta_name="french")
    deltadist.deltas_on(model)["french"].detach()
    gc.collect()
    assert deltadist.deltas_on(model) == {}
