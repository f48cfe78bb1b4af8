"""Engines: the only place that knows about DDP, FSDP, DeepSpeed and BMTrain.

One class per engine (:class:`Engine` is the plain one), listed once in :data:`ENGINES`.
"""

from __future__ import annotations

from deltadist.engines.base import Engine, record_logical_shapes, recorded_shape
from deltadist.engines.bmtrain import BMTrainEngine
from deltadist.engines.deepspeed import ZeRO3Engine
from deltadist.engines.distributed import DistributedEngine
from deltadist.engines.fsdp1 import FSDP1Engine
from deltadist.engines.fsdp2 import FSDP2Engine
from deltadist.engines.registry import (
    ENGINES,
    detect_engine,
    engine_class,
    register_engine,
    setup_engine,
    wrap_model,
)

__all__ = [
    "BMTrainEngine", "ENGINES", "DistributedEngine", "Engine", "FSDP1Engine", "FSDP2Engine", "detect_engine",
    "engine_class", "record_logical_shapes", "recorded_shape", "register_engine", "setup_engine",
    "wrap_model", "ZeRO3Engine",
]
