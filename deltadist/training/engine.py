"""Where the job runs: the single dispatch point from ``config.engine`` to a device and wrapper.

Only ``"plain"`` exists now (one process: one GPU when CUDA is available, else the CPU). Engines
for DDP, FSDP or DeepSpeed (``deltadist/engines/``) add an entry to :data:`ENGINES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from deltadist.errors import ConfigError


@dataclass(frozen=True)
class EngineSetup:
    """The device to train on and the hook that wraps the delta-fitted model for training."""

    name: str
    device: torch.device
    wrap: Callable[[nn.Module], nn.Module]


def _plain() -> EngineSetup:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return EngineSetup(name="plain", device=device, wrap=lambda model: model)


ENGINES: dict[str, Callable[[], EngineSetup]] = {"plain": _plain}


def setup_engine(name: str) -> EngineSetup:
    """The :class:`EngineSetup` for engine ``name``.

    Raises:
        ConfigError: no engine of that name (the message lists the available ones).
    """
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; available engines: {', '.join(ENGINES)}.")
    return ENGINES[name]()
