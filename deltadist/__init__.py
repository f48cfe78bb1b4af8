"""deltadist: delta tuning (LoRA, BitFit, adapters...) with OpenDelta's API, built for sharded training.

Importing deltadist imports no optional engine (DeepSpeed, BMTrain) and touches no GPU.
"""

from __future__ import annotations

from deltadist.addressing import StructureMap, register_structure_map
from deltadist.api.auto import AutoDeltaConfig, AutoDeltaModel
from deltadist.api.delta_base import DeltaBase
from deltadist.core.config import DeltaConfig
from deltadist.core.delta_module import DeltaModule
from deltadist.core.export_guard import full_state_dict
from deltadist.core.naming import deltas_on
from deltadist.core.quantized import quantize_backbone
from deltadist.core.registry import register_method
from deltadist.engines import Engine, register_engine, wrap_model
from deltadist.errors import (
    AddressingError,
    BackboneMismatchError,
    CheckpointError,
    ConfigError,
    DeltaError,
    EngineError,
    ExportError,
    SiteError,
)
from deltadist.integrations.opendelta import import_opendelta
from deltadist.integrations.prepare import prepare_model
from deltadist.interactive.visualize import Visualization
from deltadist.mechanisms.mixed_batch import mixed_batch
from deltadist.methods.adapter import AdapterConfig, AdapterModel
from deltadist.methods.bitfit import BitFitConfig, BitFitModel
from deltadist.methods.compacter import CompacterConfig, CompacterModel
from deltadist.methods.lora import LoraConfig, LoraModel
from deltadist.methods.low_rank_adapter import LowRankAdapterConfig, LowRankAdapterModel
from deltadist.methods.parallel_adapter import ParallelAdapterConfig, ParallelAdapterModel
from deltadist.methods.prefix import PrefixConfig, PrefixModel
from deltadist.methods.soft_prompt import SoftPromptConfig, SoftPromptModel

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "AdapterModel", "AddressingError", "AutoDeltaConfig", "AutoDeltaModel",
    "BackboneMismatchError", "BitFitConfig", "BitFitModel", "CheckpointError", "CompacterConfig",
    "CompacterModel", "ConfigError", "DeltaBase", "DeltaConfig", "DeltaError", "EngineError",
    "ExportError", "LoraConfig", "LoraModel", "LowRankAdapterConfig", "LowRankAdapterModel",
    "ParallelAdapterConfig", "ParallelAdapterModel", "PrefixConfig", "PrefixModel", "SiteError",
    "SoftPromptConfig", "SoftPromptModel", "Visualization",
    "deltas_on", "full_state_dict", "import_opendelta", "prepare_model", "quantize_backbone", "wrap_model",
    "mixed_batch",
    # Extension points: a method, an engine, a model family (docs/architecture.md).
    "DeltaModule", "Engine", "StructureMap", "register_engine", "register_method", "register_structure_map",
]
