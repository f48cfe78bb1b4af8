"""Timing training steps of several models side by side: interleaved rounds, one step each."""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn


def time_steps(runs: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
               loss_of: Callable[[nn.Module], torch.Tensor], rounds: int, warmup: int,
               device: torch.device) -> dict[str, list[float]]:
    """Seconds of each timed step (forward, backward, optimizer step) per run, after ``warmup``
    untimed rounds. Every round steps each run once in turn, so all see the same machine state."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(warmup + rounds):
        for name, (model, optimizer) in runs.items():
            start = time.perf_counter()
            loss = loss_of(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times
