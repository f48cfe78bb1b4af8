"""Timing steps of several runs side by side: interleaved rounds, one step of each run per round."""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn


def interleave(steps: dict[str, Callable[[], float]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """The seconds each step reports, per run, after ``warmup`` untimed rounds. Every round runs
    each step once in turn, so all see the same machine state (a step may run in another process
    and report its own time)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(warmup + rounds):
        for name, step in steps.items():
            seconds = step()
            if round_index >= warmup:
                times[name].append(seconds)
    return times


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                  loss_of: Callable[[nn.Module], torch.Tensor],
                  device: torch.device) -> Callable[[], float]:
    """A timed training step (forward, backward, optimizer step) of ``model``."""

    def step() -> float:
        start = time.perf_counter()
        loss = loss_of(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step
