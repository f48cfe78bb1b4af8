"""Reading a delta checkpoint OpenDelta wrote (``config.json`` + ``pytorch_model.bin``, as its
``save_finetuned`` and DeltaCenter store them) into a deltadist delta: :func:`import_opendelta`.

OpenDelta pickled ``backbone.state_dict()`` with only the trainable entries: its delta modules
under the modified module (``<site>.lora.lora_A``, ``<site>.adapter.modulelist.down_proj.weight``,
``<site>.bitfit.bias``), the backbone's own biases BitFit trained in place (``<site>.bias``) and
the modules ``unfrozen_modules`` kept (a task head). The tensors are read with
``torch.load(weights_only=True)`` -- no code runs -- and every key is matched to the delta
deltadist builds from the translated config on the given backbone: a key left over, one missing or
of another shape is an error listing them all, and nothing is attached then.

The methods whose function is the same in both libraries convert: LoRA (``(alpha / r) B A x`` added
to the module's output), adapters (``h + up(act(down(h)))`` after the module) and BitFit (a bias
trained in place becomes deltadist's offset from the backbone's bias). Low-rank adapters,
compacters, parallel adapters, prefixes and soft prompts compute other functions here (see
docs/differences.md) and are refused, naming why.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from deltadist.api.auto import AutoDeltaModel
from deltadist.api.delta_base import DeltaBase
from deltadist.errors import CheckpointError, ConfigError
from deltadist.io import checkpoint

CONFIG_NAME = "config.json"
WEIGHTS_NAME = checkpoint.OPENDELTA_WEIGHTS

DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    "adapter": {"bottleneck_dim": 24, "non_linearity": "gelu_new"},
    "bitfit": {},
}
"""OpenDelta's defaults of each method it converts: its config.json leaves out values equal to them."""

NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "lora": {"lora.lora_A": ("lora.lora_A",), "lora.lora_B": ("lora.lora_B",)},
    "adapter": {f"adapter.{part}.{p}": (f"adapter.modulelist.{part}_proj.{p}",)
                for part in ("down", "up") for p in ("weight", "bias")},
    "bitfit": {"bitfit.bias": ("bitfit.bias", "bias")},
}
"""Per method, a deltadist key's part after its site -> OpenDelta's spellings of it (BitFit's
``bias`` is the module's own bias, trained in place)."""

UNCONVERTIBLE = {
    "low_rank_adapter": "OpenDelta multiplied its factors elementwise, which is their product only at rank 1",
    "compacter": "OpenDelta's compacter layout and PHM rules differ",
    "parallel_adapter": "OpenDelta never applied its scale",
    "prefix": "OpenDelta's prefix tuning reparametrises the prefix differently",
    "soft_prompt": "OpenDelta's soft prompt is inserted at another place of the input",
}
DROPPED = ("opendelta_version", "transformers_version", "model_type", "backend", "backbone_hash",
           "sequential")
"""OpenDelta config keys with no deltadist meaning (``backbone_hash`` is OpenDelta's md5 of the
model's repr; deltadist writes its own fingerprint when the converted delta is saved)."""


def is_opendelta_directory(directory: Path) -> bool:
    """Whether ``directory`` holds a checkpoint in OpenDelta's format."""
    return (directory / WEIGHTS_NAME).is_file() and (directory / CONFIG_NAME).is_file()


def import_opendelta(directory: str | os.PathLike, backbone_model: nn.Module) -> DeltaBase:
    """Attach the delta OpenDelta saved in ``directory`` to ``backbone_model`` as ``from_finetuned``
    attaches a deltadist checkpoint (the backbone in eval mode; on any error left as it was);
    ``save_finetuned`` then writes it in deltadist's format.

    Raises:
        CheckpointError: the directory is not OpenDelta's, or its tensors do not fit the delta
            (every key left over, missing or of another shape is listed).
        ConfigError: a method that does not convert, or an OpenDelta option deltadist lacks.
    """
    directory = Path(directory)
    config = read_config(directory)
    tensors = read_tensors(directory)
    delta = AutoDeltaModel.from_config(config, backbone_model=backbone_model)
    try:
        delta.load_state_dict(_converted(delta, tensors, backbone_model, directory),
                              where=f"{directory / WEIGHTS_NAME} (OpenDelta's keys, converted)")
    except BaseException:
        delta._forget()  # as from_finetuned: the backbone is left exactly as it was
        raise
    backbone_model.eval()
    return delta


def read_config(directory: Path) -> dict[str, Any]:
    """OpenDelta's config.json as a deltadist delta config (its defaults filled in, its own keys
    dropped). ``backend="bmt"`` is accepted: deltadist detects the engine from the model."""
    if not is_opendelta_directory(directory):
        present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        raise CheckpointError(f"{directory} is not an OpenDelta checkpoint: it needs {CONFIG_NAME} and "
                              f"{WEIGHTS_NAME} (it holds: {', '.join(present) or 'nothing'}).")
    try:
        stored = json.loads((directory / CONFIG_NAME).read_text())
    except ValueError as err:
        raise CheckpointError(f"{directory / CONFIG_NAME}: not JSON ({err}).") from err
    delta_type = stored.get("delta_type") if isinstance(stored, dict) else None
    if delta_type in UNCONVERTIBLE:
        why = UNCONVERTIBLE[delta_type]
        raise ConfigError(f"{directory}: OpenDelta's {delta_type} does not convert ({why}: "
                          f"its tensors would compute another function here); only {', '.join(NAMES)} do. "
                          "Train the delta again with deltadist.")
    if delta_type not in NAMES:
        raise CheckpointError(f"{directory / CONFIG_NAME} names no delta_type OpenDelta writes "
                              f"(got {delta_type!r}); converting takes {', '.join(NAMES)}.")
    if stored.get("sequential", True) is not True:
        raise ConfigError(f"{directory}: an OpenDelta adapter with sequential=False has no deltadist "
                          "counterpart (deltadist's adapters follow their module).")
    config = {**DEFAULTS[delta_type], "unfrozen_modules": ["deltas"],  # OpenDelta's default
              **{k: v for k, v in stored.items() if k not in DROPPED}}
    return config


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The pickled state dict, read without running code (tensors and containers only)."""
    path = directory / WEIGHTS_NAME
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's unpickler raises many types for a file that is not a state dict
        raise CheckpointError(f"{path}: not a state dict torch.load can read without running code "
                              f"({type(err).__name__}: {err}).") from err
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path}: expected a mapping of names to tensors, got {type(loaded).__name__}.")
    return dict(loaded)


def _converted(delta: DeltaBase, tensors: dict[str, torch.Tensor], backbone: nn.Module,
               directory: Path) -> dict[str, torch.Tensor]:
    """``tensors`` under deltadist's keys: each delta parameter from the OpenDelta spelling found,
    a bias trained in place less the backbone's; kept backbone parameters as they are. Keys no
    parameter takes stay under their own name (``load_state_dict`` lists them as unexpected)."""
    spellings = NAMES[delta.delta_type]
    sites = sorted(delta.record.site_names, key=len, reverse=True)
    converted, used = {}, set()
    for key in dict(delta.named_parameters()):
        site = next((s for s in sites if key.startswith(s + ".")), None)
        rest = key[len(site) + 1:] if site is not None else None
        if rest not in spellings:  # a kept backbone parameter: the same name in both
            if key in tensors:
                converted[key], used = tensors[key], used | {key}
            continue
        for spelling in spellings[rest]:
            source = f"{site}.{spelling}"
            if source in tensors:
                value = tensors[source].float()
                own = getattr(backbone.get_submodule(site), "bias", None) if spelling == "bias" else None
                converted[key] = value - own.detach().float().cpu() if own is not None else value
                used.add(source)
                break
    converted.update({k: v for k, v in tensors.items() if k not in used})
    return converted
