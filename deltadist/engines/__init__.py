"""Engines: the only place that knows about DDP, FSDP, DeepSpeed and BMTrain."""

from __future__ import annotations

from torch import nn

from deltadist.engines.base import Engine

# Most specific first; the plain engine claims everything and comes last.
ENGINES: list[type[Engine]] = [Engine]


def detect_engine(model: nn.Module) -> Engine:
    """The engine that manages ``model``."""
    for engine_cls in ENGINES:
        if engine_cls.claims(model):
            return engine_cls()
    return Engine()


__all__ = ["ENGINES", "Engine", "detect_engine"]
