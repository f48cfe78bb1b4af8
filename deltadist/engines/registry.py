"""The engines by name: the one list of them that the training job, its config's help, the CLI
and ``wrap_model`` read; detection of the engine that manages a model reads it too."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from deltadist.engines.base import Engine
from deltadist.engines.bmtrain import BMTrainEngine
from deltadist.engines.deepspeed import ZeRO3Engine
from deltadist.engines.distributed import DistributedEngine
from deltadist.engines.fsdp1 import FSDP1Engine
from deltadist.engines.fsdp2 import FSDP2Engine
from deltadist.engines.runtime import EngineSetup
from deltadist.errors import ConfigError

ENGINES: dict[str, type[Engine]] = {
    engine.name: engine
    for engine in (Engine, DistributedEngine, FSDP2Engine, FSDP1Engine, ZeRO3Engine, BMTrainEngine)
}
"""Engine classes by name, from the most general to the most specific."""


def register_engine(engine: type[Engine]) -> type[Engine]:
    """Class decorator: make ``engine`` known by its ``name`` (to detection, which asks it before
    the engines registered earlier, to ``setup_engine``, ``wrap_model`` and the training job).

    Raises:
        ConfigError: another engine class has that name.
    """
    known = ENGINES.get(engine.name)
    if known is not None and known is not engine:
        raise ConfigError(f"An engine named {engine.name!r} is registered already ({known.__qualname__}); "
                          f"give {engine.__qualname__} another name.")
    ENGINES[engine.name] = engine
    return engine


def engine_class(name: str) -> type[Engine]:
    """The engine class called ``name``.

    Raises:
        ConfigError: no engine has that name (the message lists the available ones).
    """
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; available engines: {', '.join(ENGINES)}.")
    return ENGINES[name]


def detect_engine(model: nn.Module) -> Engine:
    """The engine that manages ``model``: the most specific one that claims it (the plain engine
    claims everything)."""
    for engine in reversed(ENGINES.values()):
        if engine.claims(model):
            return engine.for_model(model)
    return Engine()


def setup_engine(name: str, environ: Mapping[str, str] | None = None, **options: Any) -> EngineSetup:
    """The :class:`EngineSetup` for engine ``name`` (initialising the process group if needed).

    ``environ`` (default ``os.environ``) is where the launcher's variables are read.

    Raises:
        ConfigError: no engine of that name (the message lists the available ones), ``plain`` in
            a world of several ranks, or malformed launch variables.
    """
    return engine_class(name).launch(environ, **options)


def wrap_model(model: nn.Module, engine: str, device: torch.device) -> nn.Module:
    """Wrap ``model`` (deltas attached, frozen) for ``engine``; return what to call and train.

    ``fsdp2`` shards every repeated block and then the root with ``fully_shard`` (in place, the
    returned model is ``model``); ``fsdp1`` wraps with ``use_orig_params=True`` (needed to mix
    frozen and trainable parameters in one unit), one unit per block; ``ddp`` wraps in
    ``DistributedDataParallel``. Parameters still on ``meta`` are materialised on ``device``
    by FSDP (values must be loaded afterwards).

    Raises:
        ConfigError: no engine of that name (the message lists the available ones).
    """
    return engine_class(engine).wrap(model, device)
