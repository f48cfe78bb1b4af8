"""Checkpoint hygiene: file modes, a weights checksum, state_dict copies, errors that say what to do."""

from __future__ import annotations

import errno
import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import deltadist.io.checkpoint as checkpoint
from deltadist import AddressingError, AutoDeltaConfig, AutoDeltaModel, CheckpointError, LoraModel
from tests.checkpoints import change_every_parameter, reloaded_logits
from tests.snapshot import assert_same_snapshot, snapshot
from tests.tiny import build_tiny, logits_of, tiny_inputs


def checkpoint_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- permissions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002], ids=oct)
def test_checkpoint_files_get_the_mode_the_umask_gives_any_new_file(tmp_path: Path, umask: int) -> None:
    delta = LoraModel(backbone_model=build_tiny("bert", "cls"), lora_r=4)
    previous = os.umask(umask)
    try:
        delta.save_finetuned(tmp_path / "delta")
        (tmp_path / "plain.txt").write_text("made by open()")
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == expected
    for name in (checkpoint.WEIGHTS_NAME, checkpoint.CONFIG_NAME):
        assert (tmp_path / "delta" / name).stat().st_mode & 0o777 == expected, name


# -- checksum ---------------------------------------------------------------------------------------
def test_the_weights_checksum_is_stored_in_the_header_and_the_mirror(saved) -> None:
    _, delta, directory, _ = saved
    with safe_open(str(directory / checkpoint.WEIGHTS_NAME), framework="pt") as handle:
        header = json.loads(handle.metadata()["deltadist_config"])
    mirror = json.loads((directory / checkpoint.CONFIG_NAME).read_text())
    assert header[checkpoint.CHECKSUM_KEY] == mirror[checkpoint.CHECKSUM_KEY]
    assert header[checkpoint.CHECKSUM_KEY] == checkpoint.tensors_sha256(delta.state_dict())
    assert AutoDeltaConfig.from_finetuned(directory).delta_type == "lora"  # a provenance key, not a field


def test_tensors_sha256_covers_names_dtypes_shapes_and_values() -> None:
    base = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "b": torch.tensor(1.5, dtype=torch.bfloat16)}
    digest = checkpoint.tensors_sha256(base)
    assert digest == checkpoint.tensors_sha256(dict(reversed(base.items())))  # dict order not hashed
    variants = [
        {**base, "a": base["a"].reshape(3, 2)},  # same bytes, other shape
        {**base, "a": base["a"].view(torch.int32)},  # same bytes, other dtype
        {"c": base["a"], "b": base["b"]},  # other name
        {**base, "b": torch.tensor(1.25, dtype=torch.bfloat16)},  # other value
    ]
    assert all(checkpoint.tensors_sha256(variant) != digest for variant in variants)


def test_a_byte_flipped_in_the_data_section_is_refused_and_the_backbone_untouched(saved) -> None:
    _, _, directory, _ = saved
    weights = directory / checkpoint.WEIGHTS_NAME
    raw = bytearray(weights.read_bytes())
    (header_size,) = struct.unpack("<Q", raw[:8])
    data_start = 8 + header_size
    raw[data_start + (len(raw) - data_start) // 2] ^= 0x01  # the header still parses
    weights.write_bytes(bytes(raw))
    fresh = build_tiny("bert", "cls")
    before = snapshot(fresh)
    expected = re.escape(str(weights)) + ".*modified or corrupted.*Save the delta"
    with pytest.raises(CheckpointError, match=expected):
        AutoDeltaModel.from_finetuned(directory, backbone_model=fresh)
    assert_same_snapshot(before, snapshot(fresh))


def test_a_checkpoint_saved_without_a_checksum_still_loads(saved) -> None:
    _, _, directory, tuned = saved
    weights = directory / checkpoint.WEIGHTS_NAME
    with safe_open(str(weights), framework="pt") as handle:
        config = json.loads(handle.metadata()["deltadist_config"])
    del config[checkpoint.CHECKSUM_KEY]  # as written before checksums existed
    text = json.dumps(config, indent=2, sort_keys=True)
    save_file(load_file(str(weights)), str(weights), metadata={"deltadist_config": text})
    (directory / checkpoint.CONFIG_NAME).write_text(text + "\n")
    assert torch.equal(reloaded_logits(directory), tuned)


# -- state_dict copies ------------------------------------------------------------------------------
def test_state_dict_values_do_not_change_when_training_goes_on(saved) -> None:
    _, delta, _, _ = saved
    state = delta.state_dict()
    frozen = {key: value.clone() for key, value in state.items()}
    change_every_parameter(delta)
    assert all(torch.equal(state[key], frozen[key]) for key in state)
    params = dict(delta.named_parameters())
    assert all(state[k].untyped_storage().data_ptr() != params[k].untyped_storage().data_ptr() for k in state)


# -- errors that name the path and the fix ----------------------------------------------------------
@pytest.mark.parametrize("target", ["x.safetensors", "x.safetensors/delta"])
def test_saving_onto_or_under_an_existing_file_names_it(tmp_path: Path, target: str) -> None:
    existing = tmp_path / "x.safetensors"
    existing.write_bytes(b"keep me")
    delta = LoraModel(backbone_model=build_tiny("bert", "cls"), lora_r=4)
    with pytest.raises(CheckpointError, match=re.escape(str(existing)) + r" is (an existing|a) file.*Pass a"):
        delta.save_finetuned(tmp_path / target)
    assert existing.read_bytes() == b"keep me"
    assert checkpoint_files(tmp_path) == ["x.safetensors"]


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"),
     SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")],
    ids=["OSError", "SafetensorError"],
)
def test_a_failed_write_names_the_directory_and_keeps_the_previous_checkpoint(
        saved, monkeypatch, failure) -> None:
    _, delta, directory, tuned = saved
    change_every_parameter(delta)

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise failure

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(CheckpointError, match=re.escape(str(directory)) + ".*No space left.*"
                       r"(Free disk space|free disk space).*another directory.*intact") as caught:
        delta.save_finetuned(directory)
    assert caught.value.__cause__ is failure
    assert checkpoint_files(directory) == sorted([checkpoint.WEIGHTS_NAME, checkpoint.CONFIG_NAME])
    assert torch.equal(reloaded_logits(directory), tuned)


BAD_REGEX = "[r]layer.(["
BAD_REGEX_ERROR = re.escape(repr(BAD_REGEX)) + ".*unterminated character set.*Fix the regex.*escape"


def test_a_failed_config_mirror_write_says_the_new_weights_are_complete(saved, monkeypatch) -> None:
    model, delta, directory, _ = saved
    change_every_parameter(delta)
    new = logits_of(model, tiny_inputs("bert"))

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(CheckpointError, match=f"{checkpoint.CONFIG_NAME} failed.*Free disk space.*"
                       f"new {re.escape(checkpoint.WEIGHTS_NAME)} is complete"):
        delta.save_finetuned(directory)
    monkeypatch.undo()
    assert checkpoint_files(directory) == sorted([checkpoint.WEIGHTS_NAME, checkpoint.CONFIG_NAME])
    fresh = build_tiny("bert", "cls")
    with pytest.warns(UserWarning, match="interrupted save"):
        AutoDeltaModel.from_finetuned(directory, backbone_model=fresh)
    assert torch.equal(logits_of(fresh, tiny_inputs("bert")), new)


@pytest.mark.parametrize("field", ["modified_modules", "exclude_modules"])
def test_an_invalid_regex_pattern_is_named_with_the_fix(field: str) -> None:
    model = build_tiny("bert", "cls")
    before = snapshot(model)
    with pytest.raises(AddressingError, match=BAD_REGEX_ERROR):
        LoraModel(backbone_model=model, lora_r=4, **{field: [BAD_REGEX]})
    assert_same_snapshot(before, snapshot(model))


def test_an_invalid_regex_in_unfrozen_modules_fails_at_construction_changing_nothing() -> None:
    model = build_tiny("bert", "cls")
    before = snapshot(model)
    with pytest.raises(AddressingError, match=BAD_REGEX_ERROR):
        LoraModel(backbone_model=model, lora_r=4, unfrozen_modules=["deltas", BAD_REGEX])
    assert_same_snapshot(before, snapshot(model))


def test_loading_a_file_outside_any_checkpoint_names_it(tmp_path: Path) -> None:
    stray = tmp_path / "notes.txt"
    stray.write_text("not a checkpoint")
    expected = re.escape(str(stray)) + ".*Pass the directory that save_finetuned"
    with pytest.raises(CheckpointError, match=expected):
        AutoDeltaModel.from_finetuned(stray, backbone_model=build_tiny("bert", "cls"))


def test_loading_a_directory_without_weights_names_it_and_the_checkpoints_below(saved) -> None:
    _, _, directory, _ = saved
    parent = directory.parent
    with pytest.raises(CheckpointError, match=re.escape(str(parent)) + ".*Pass the directory that "
                       "save_finetuned.*subdirectories hold one: delta"):
        AutoDeltaModel.from_finetuned(parent, backbone_model=build_tiny("bert", "cls"))
