"""Checkpoints: atomic writes, safe reads, clear errors that name the file, the hub cache path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import deltadist.io.checkpoint as checkpoint
from deltadist import AutoDeltaConfig, AutoDeltaModel, CheckpointError
from tests.checkpoints import change_every_parameter, reloaded_logits
from tests.snapshot import assert_same_snapshot, snapshot
from tests.tiny import build_tiny, logits_of, tiny_inputs


def test_checkpoint_holds_only_delta_tensors_and_its_config(saved) -> None:
    model, delta, directory, _ = saved
    with safe_open(str(directory / checkpoint.WEIGHTS_NAME), framework="pt") as handle:
        keys = set(handle.keys())
        config = json.loads(handle.metadata()["deltadist_config"])
    assert keys == set(dict(delta.named_parameters()))
    assert keys - set(delta.delta_parameters()) == {"classifier.weight", "classifier.bias"}  # the task head
    assert all(".lora.lora_" in k for k in delta.delta_parameters())
    assert config["delta_type"] == "lora" and config["lora_r"] == 4
    assert config["backbone_class"] == type(model).__name__
    assert len(config["backbone_hash"]) == 64
    assert "torch" in config["library_versions"]
    mirror = json.loads((directory / checkpoint.CONFIG_NAME).read_text())
    assert mirror == config


def test_interrupted_save_leaves_the_previous_checkpoint(saved, monkeypatch) -> None:
    model, delta, directory, tuned = saved
    change_every_parameter(delta)

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        delta.save_finetuned(directory)
    files = sorted(p.name for p in directory.iterdir())
    assert files == sorted([checkpoint.WEIGHTS_NAME, checkpoint.CONFIG_NAME])
    assert torch.equal(reloaded_logits(directory), tuned)


def test_crash_between_weights_and_config_mirror_still_loads_the_new_weights(saved, monkeypatch) -> None:
    model, delta, directory, _ = saved
    change_every_parameter(delta)
    new = logits_of(model, tiny_inputs("bert"))
    real = checkpoint.atomic_write

    def second_write_crashes(target, write):
        if target.name == checkpoint.CONFIG_NAME:
            raise KeyboardInterrupt
        real(target, write)

    monkeypatch.setattr(checkpoint, "atomic_write", second_write_crashes)
    with pytest.raises(KeyboardInterrupt):
        delta.save_finetuned(directory)
    monkeypatch.undo()
    fresh = build_tiny("bert", "cls")
    with pytest.warns(UserWarning, match="interrupted save"):
        AutoDeltaModel.from_finetuned(directory, backbone_model=fresh)
    assert torch.equal(logits_of(fresh, tiny_inputs("bert")), new)


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_broken_weights_file_is_named_and_nothing_changes(saved, damage: str) -> None:
    _, _, directory, _ = saved
    weights = directory / checkpoint.WEIGHTS_NAME
    if damage == "missing":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.write_bytes(b"\x00" * 64)
    fresh = build_tiny("bert", "cls")
    before = snapshot(fresh)
    with pytest.raises(CheckpointError, match=str(weights)):
        AutoDeltaModel.from_finetuned(directory, backbone_model=fresh)
    assert_same_snapshot(before, snapshot(fresh))


def test_tensors_that_do_not_fit_are_listed_and_nothing_changes(saved, tmp_path) -> None:
    model, delta, directory, _ = saved
    state = delta.state_dict()
    key = sorted(state)[0]
    state[key] = torch.zeros(3, 3)
    fresh = build_tiny("bert", "cls")
    before = snapshot(fresh)
    with pytest.raises(CheckpointError, match=r"wrong shape: .*\[3, 3\]"):
        AutoDeltaModel.from_finetuned(directory, backbone_model=fresh, state_dict=state)
    assert_same_snapshot(before, snapshot(fresh))
    del state[key]
    with pytest.raises(CheckpointError, match="missing"):
        AutoDeltaModel.from_finetuned(directory, backbone_model=fresh, state_dict=state)
    assert_same_snapshot(before, snapshot(fresh))


def test_missing_directory_error_says_what_to_do(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a local directory"):
        AutoDeltaModel.from_finetuned(tmp_path / "nope", backbone_model=build_tiny("bert", "cls"))


def test_loading_from_a_hub_repo_id_uses_the_local_cache_offline(saved, tmp_path) -> None:
    _, _, directory, tuned = saved
    cache = tmp_path / "hub"
    snapshot_dir = cache / "models--someone--bert-lora" / "snapshots" / ("0" * 40)
    shutil.copytree(directory, snapshot_dir)
    (cache / "models--someone--bert-lora" / "refs").mkdir()
    (cache / "models--someone--bert-lora" / "refs" / "main").write_text("0" * 40)
    config = AutoDeltaConfig.from_finetuned("someone/bert-lora", cache_dir=cache, local_files_only=True)
    assert config.delta_type == "lora"
    fresh = build_tiny("bert", "cls")
    AutoDeltaModel.from_finetuned("someone/bert-lora", backbone_model=fresh, cache_dir=cache,
                                  local_files_only=True)
    assert torch.equal(logits_of(fresh, tiny_inputs("bert")), tuned)
    with pytest.raises(CheckpointError, match="someone/absent"):
        AutoDeltaModel.from_finetuned("someone/absent", backbone_model=fresh, cache_dir=cache,
                                      local_files_only=True)


def test_loading_runs_no_pickle(saved, monkeypatch) -> None:
    _, _, directory, _ = saved

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle-based torch.load was called")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr("pickle.load", forbidden)
    AutoDeltaModel.from_finetuned(directory, backbone_model=build_tiny("bert", "cls"))
