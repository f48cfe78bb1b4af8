"""Timing training steps of several models side by side (interleaved rounds, one step each), on
the model and batch every step benchmark trains: the shipped MiniLM-L6 with a 4-class head."""

from __future__ import annotations

import os
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


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_of: Callable[[nn.Module], torch.Tensor],
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


def time_steps(runs: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
               loss_of: Callable[[str, nn.Module], torch.Tensor], rounds: int, warmup: int,
               device: torch.device) -> dict[str, list[float]]:
    """Seconds of each timed training step per run, interleaved (:func:`interleave`).
    ``loss_of(name, model)``: the run's loss."""
    return interleave({name: training_step(model, optimizer, lambda m, name=name: loss_of(name, m), device)
                       for name, (model, optimizer) in runs.items()}, rounds, warmup)


def minilm_classifier() -> nn.Module:
    """all-MiniLM-L6-v2 (BERT, 22.7M parameters) with a 4-class head, seeded, without dropout."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from deltadist.training.model import build_model

    model, _ = build_model("builtin:minilm", num_labels=4, seed=0, dropout=0.0, show_progress=False)
    return model


BATCH_ROWS, BATCH_TOKENS = 32, 64


def batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids [32, 64], attention_mask, labels [32])``, the same in every run."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (BATCH_ROWS, BATCH_TOKENS), generator=generator)
    return ids.to(device), torch.ones_like(ids).to(device), torch.randint(0, 4, (BATCH_ROWS,)).to(device)


Build = Callable[[], tuple[nn.Module, list[nn.Parameter]]]
"""Makes a model to train and the parameters its optimizer steps."""


def time_methods(methods: dict[str, Build], rounds: int, warmup: int,
                 device: torch.device) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Each method's model trained with AdamW on :func:`batch`, timed by :func:`time_steps`:
    the seconds of every timed step, and each method's number of trained values."""
    runs, trainable = {}, {}
    for name, build in methods.items():
        model, params = build()
        model.to(device).train()
        runs[name] = (model, torch.optim.AdamW(params, lr=1e-4))
        trainable[name] = sum(p.numel() for p in params)
    ids, mask, labels = batch(device)
    times = time_steps(runs, lambda _, model: nn.functional.cross_entropy(model(ids, mask), labels),
                       rounds, warmup, device)
    return times, trainable
