"""The learning-rate schedule: linear warm-up, then constant, cosine or linear decay to 0."""

from __future__ import annotations

import math
from typing import Callable


def lr_schedule(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The factor of the peak learning rate for each step (``LambdaLR``'s function).

    Step ``s`` (0-based: the factor the ``s``-th optimizer step uses) warms up as
    ``(s + 1) / (warmup_steps + 1)``, so the first step does not have a zero learning rate; after
    warm-up, ``constant`` keeps 1, ``cosine`` and ``linear`` decay to 0 at ``total_steps``.
    """
    decay_steps = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        return 1.0

    return factor
