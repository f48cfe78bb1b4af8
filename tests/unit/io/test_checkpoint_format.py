"""What a checkpoint's config may be: a format this deltadist knows, JSON of a sane depth.

A delta saved by a newer deltadist (a higher ``format_version``) is refused, naming both versions;
a config nested 100,000 levels deep (in the safetensors header or the JSON mirror) is a
:class:`CheckpointError`, not a ``RecursionError``. In every case the backbone is left as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import deltadist.io.checkpoint as checkpoint
from deltadist import AutoDeltaConfig, AutoDeltaModel, CheckpointError, LoraModel
from deltadist.core.config import CONFIG_FORMAT_VERSION
from deltadist.core.jsontext import MAX_JSON_DEPTH, json_depth
from tests.snapshot import assert_same_snapshot, snapshot
from tests.tiny import build_tiny

DEEP = 100_000


def _rewrite_header(directory: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """Write ``delta.safetensors`` again with ``change(config)`` (a dict or raw text) as its config."""
    weights = directory / checkpoint.WEIGHTS_NAME
    with safe_open(str(weights), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        config = json.loads(handle.metadata()["deltadist_config"])
    new = change(config)
    text = new if isinstance(new, str) else json.dumps(new)
    save_file(tensors, str(weights), metadata={"deltadist_config": text})
    if not isinstance(new, str):
        (directory / checkpoint.CONFIG_NAME).write_text(text)


def _assert_refused(directory: Path, match: str) -> None:
    """Every way of reading a saved delta raises ``CheckpointError`` and leaves the backbone as it was."""
    for how in ("AutoDeltaModel.from_finetuned", "LoraModel.from_finetuned", "AutoDeltaConfig.from_finetuned",
                "load_finetuned"):
        model = build_tiny("bert", "cls")
        delta = LoraModel(model, lora_r=4) if how == "load_finetuned" else None
        before = snapshot(model)
        with pytest.raises(CheckpointError, match=match):
            if how == "AutoDeltaModel.from_finetuned":
                AutoDeltaModel.from_finetuned(directory, model)
            elif how == "LoraModel.from_finetuned":
                LoraModel.from_finetuned(directory, model)
            elif how == "AutoDeltaConfig.from_finetuned":
                AutoDeltaConfig.from_finetuned(directory)
            else:
                delta.load_finetuned(directory)
        assert_same_snapshot(before, snapshot(model))


def test_save_finetuned_writes_this_versions_format(saved) -> None:
    _, _, directory, _ = saved
    assert checkpoint.read_config(directory)["format_version"] == CONFIG_FORMAT_VERSION


def test_a_delta_from_a_newer_deltadist_is_refused_naming_both_versions(saved) -> None:
    _, _, directory, _ = saved
    newer = CONFIG_FORMAT_VERSION + 1
    _rewrite_header(directory, lambda config: {**config, "format_version": newer})
    _assert_refused(directory, rf"written by a newer deltadist: its config has format_version {newer}, "
                               rf"and this deltadist \(.*\) reads format_version {CONFIG_FORMAT_VERSION} "
                               r"and older\. Upgrade deltadist")


def test_a_config_without_format_version_still_loads(saved) -> None:
    _, _, directory, _ = saved
    _rewrite_header(directory, lambda config: {k: v for k, v in config.items() if k != "format_version"})
    AutoDeltaModel.from_finetuned(directory, build_tiny("bert", "cls"))


@pytest.mark.parametrize("version", ["2", True, 1.5, None, [1]])
def test_a_format_version_that_is_not_an_integer_is_refused(saved, version: Any) -> None:
    _, _, directory, _ = saved
    _rewrite_header(directory, lambda config: {**config, "format_version": version})
    _assert_refused(directory, "format_version must be an integer")


@pytest.mark.parametrize("text", [
    "[" * DEEP + "]" * DEEP,
    '{"delta_type": "lora", "lora_r": ' + "[" * DEEP + "]" * DEEP + "}",
    '{"delta_type": "lora", "x": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}",
], ids=["array", "in-a-field", "objects"])
def test_a_header_config_nested_100000_deep_is_a_checkpoint_error(saved, text: str) -> None:
    _, _, directory, _ = saved
    _rewrite_header(directory, lambda config: text)
    _assert_refused(directory, r"delta\.safetensors: its 'deltadist_config' header entry is not a config "
                               "deltadist can have written")


def test_a_mirror_nested_100000_deep_is_a_checkpoint_error(saved) -> None:
    _, _, directory, _ = saved
    (directory / checkpoint.CONFIG_NAME).write_text('{"save_id": ' + "[" * DEEP + "]" * DEEP + "}")
    with pytest.raises(CheckpointError, match=r"delta_config\.json: its JSON is not a config deltadist"):
        AutoDeltaModel.from_finetuned(directory, build_tiny("bert", "cls"))


def test_nesting_is_measured_outside_strings() -> None:
    assert json_depth('{"modified_modules": ["[r]layers\\\\.[0-3]\\"[[{"], "x": [[]]}') == 3
    assert json_depth(b"[" * DEEP) == DEEP
    assert json_depth("") == 0 and MAX_JSON_DEPTH >= 10
