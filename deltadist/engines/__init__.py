"""Engines: the only place that knows about DDP, FSDP, DeepSpeed and BMTrain."""

from __future__ import annotations

from torch import nn

from deltadist.engines.base import Engine, record_logical_shapes, recorded_shape
from deltadist.engines.bmtrain import BMTrainEngine
from deltadist.engines.deepspeed import ZeRO3Engine
from deltadist.engines.distributed import DistributedEngine
from deltadist.engines.fsdp1 import FSDP1Engine
from deltadist.engines.fsdp2 import FSDP2Engine

# Most specific first; the plain engine claims everything and comes last.
ENGINES: list[type[Engine]] = [
    BMTrainEngine, ZeRO3Engine, FSDP2Engine, FSDP1Engine, DistributedEngine, Engine,
]


def detect_engine(model: nn.Module) -> Engine:
    """The engine that manages ``model``."""
    for engine_cls in ENGINES:
        if engine_cls.claims(model):
            return engine_cls.for_model(model)
    return Engine()


__all__ = [
    "BMTrainEngine", "ENGINES", "DistributedEngine", "Engine", "FSDP1Engine", "FSDP2Engine", "detect_engine",
    "record_logical_shapes", "recorded_shape", "ZeRO3Engine",
]
