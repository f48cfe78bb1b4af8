"""The delta types ``AutoDeltaConfig`` / ``AutoDeltaModel`` know, by ``delta_type``."""

from __future__ import annotations

from deltadist.api.delta_base import DeltaBase
from deltadist.config import canonical_delta_type
from deltadist.errors import ConfigError, closest
from deltadist.methods.adapter import AdapterModel
from deltadist.methods.bitfit import BitFitModel
from deltadist.methods.compacter import CompacterModel
from deltadist.methods.lora import LoraModel
from deltadist.methods.low_rank_adapter import LowRankAdapterModel
from deltadist.methods.parallel_adapter import ParallelAdapterModel
from deltadist.methods.prefix import PrefixModel
from deltadist.methods.soft_prompt import SoftPromptModel

DELTA_MODELS: dict[str, type[DeltaBase]] = {
    cls.delta_type: cls for cls in (
        LoraModel, BitFitModel, AdapterModel, LowRankAdapterModel, CompacterModel, ParallelAdapterModel,
        PrefixModel, SoftPromptModel,
    )
}


def delta_model_class(delta_type: object) -> type[DeltaBase]:
    """The delta class for ``delta_type``.

    Raises:
        ConfigError: unknown type (the known ones are listed).
    """
    delta_type = canonical_delta_type(delta_type)
    if delta_type not in DELTA_MODELS:
        near = closest(str(delta_type), DELTA_MODELS, 2)
        raise ConfigError(
            f"Unknown delta_type {delta_type!r} (did you mean {' or '.join(map(repr, near))}?). "
            f"Known delta types: {', '.join(sorted(DELTA_MODELS))}."
        )
    return DELTA_MODELS[delta_type]
