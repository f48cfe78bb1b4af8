"""``AutoDeltaConfig`` / ``AutoDeltaModel``: pick the delta class from ``delta_type``."""

from __future__ import annotations

import os
from typing import Any, Mapping

from torch import nn

from deltadist.api.delta_base import DeltaBase
from deltadist.core.config import DeltaConfig, shown
from deltadist.core.registry import delta_model_class
from deltadist.errors import ConfigError
from deltadist.io import checkpoint, peft


class AutoDeltaConfig:
    """Factory of delta configs; not instantiable."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("Use AutoDeltaConfig.from_dict(...) or AutoDeltaConfig.from_finetuned(...).")

    @staticmethod
    def from_dict(config_dict: Mapping[str, Any], **kwargs: Any) -> DeltaConfig:
        """The config class named by ``config_dict["delta_type"]``, built from the dict.

        Example:
            >>> AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": 5}).lora_r
            5
        """
        if not isinstance(config_dict, Mapping):
            raise ConfigError(f"A delta config must be a mapping of field names to values (with "
                              f"'delta_type'), got {shown(config_dict)}.")
        if "delta_type" not in config_dict:
            raise ConfigError("The config dict has no 'delta_type' key; add one, e.g. 'lora'.")
        cls = delta_model_class(config_dict["delta_type"]).config_class
        return cls.from_dict(config_dict, **kwargs)

    @staticmethod
    def from_finetuned(finetuned_delta_path: str | os.PathLike, cache_dir: str | None = None,
                       local_files_only: bool = False, revision: str | None = None,
                       **kwargs: Any) -> DeltaConfig:
        """The config saved with a delta checkpoint (local directory or hub repo id)."""
        directory = checkpoint.resolve_checkpoint(finetuned_delta_path, cache_dir, local_files_only, revision)
        return AutoDeltaConfig.from_dict(checkpoint.read_config(directory), **kwargs)


class AutoDeltaModel:
    """Factory of delta models; not instantiable."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("Use AutoDeltaModel.from_config(...) or AutoDeltaModel.from_finetuned(...).")

    @staticmethod
    def from_config(config: DeltaConfig | Mapping[str, Any], backbone_model: nn.Module,
                    **kwargs: Any) -> DeltaBase:
        """Attach a fresh delta of the config's type to ``backbone_model``."""
        if isinstance(config, Mapping):
            config = AutoDeltaConfig.from_dict(config)
        elif not isinstance(config, DeltaConfig):
            raise ConfigError(f"config must be a DeltaConfig or a dict, got {shown(config)}.")
        return delta_model_class(config.delta_type).from_config(config, backbone_model, **kwargs)

    @staticmethod
    def from_finetuned(finetuned_delta_path: str | os.PathLike, backbone_model: nn.Module,
                       cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                       revision: str | None = None, **kwargs: Any) -> DeltaBase:
        """Attach a saved delta (local directory or hub repo id) and load its tensors.

        A PEFT LoRA adapter directory (``adapter_config.json`` with ``peft_type: "LORA"``) is
        loaded as an equivalent :class:`~deltadist.LoraModel`.
        """
        directory = checkpoint.resolve_checkpoint(finetuned_delta_path, cache_dir, local_files_only, revision)
        if peft.is_peft_directory(directory):
            delta_type = "lora"  # read_peft refuses other PEFT types, naming them
        else:
            delta_type = checkpoint.read_config(directory).get("delta_type")
        return delta_model_class(delta_type).from_finetuned(directory, backbone_model, **kwargs)
