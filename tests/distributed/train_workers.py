"""Rank-side function for ``test_train_job.py``: ``deltadist train`` on a rank of a gloo world."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any


def train_on_rank(rank: int, world_size: int, config: str, overrides: list[str], resume: bool) -> Any:
    """Run the job at ``config`` with ``overrides`` on this rank; the main rank's metrics (else None)."""
    from deltadist.training.config import load_config
    from deltadist.training.loop import train

    result = train(load_config(config, overrides), resume=resume)
    return asdict(result.metrics) if result.metrics is not None else None
