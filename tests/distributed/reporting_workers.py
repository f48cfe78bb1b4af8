"""Rank-side function for ``test_reporting_ranks.py``: ``deltadist train`` on a rank of a gloo world,
dying (as if killed: no cleanup runs) during a given step."""

from __future__ import annotations

import os
import time
from typing import Any


def train_dying_in_step(rank: int, world_size: int, config: str, overrides: list[str], step: int) -> Any:
    """Run the job at ``config`` with ``overrides``; every rank exits at once during step ``step``,
    two seconds in (W&B writes its run file every second)."""
    from deltadist.training import steps
    from deltadist.training.config import load_config
    from deltadist.training.loop import train

    real_step, calls = steps.StepRunner.train_step, [0]

    def train_step(self: steps.StepRunner, batch: list) -> steps.StepOutcome:
        calls[0] += 1
        if calls[0] == step:
            time.sleep(2)
            os._exit(9)
        return real_step(self, batch)

    steps.StepRunner.train_step = train_step
    train(load_config(config, overrides))
