"""Backbone fingerprint: a cheap, device-independent identity of a backbone checkpoint.

OpenDelta hashed the string form of the model and every parameter (slow on big models, and
different on every device). Here each backbone parameter contributes its canonical name, its
logical shape and ``SAMPLES_PER_TENSOR`` values at fixed, evenly spaced flat positions, rounded to
bfloat16 so that an fp32 checkpoint and its bf16 copy agree. Sampling goes through the engine, so
a sharded parameter only contributes the few values asked for, never a full gather.

Two checkpoints of one architecture differ in practically every weight, so a few samples per
tensor tell them apart; the cost is independent of the model size per tensor (well under a
second for a 1B model on CPU, see ``benchmarks/fingerprint.py``).
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch
from torch import nn

from deltadist.addressing.names import canonical_parameters
from deltadist.attach import delta_modules
from deltadist.engines import Engine

SAMPLES_PER_TENSOR = 16


def sample_positions(numel: int) -> torch.Tensor:
    """Evenly spaced flat indices (first and last included) of a tensor with ``numel`` values."""
    count = min(SAMPLES_PER_TENSOR, numel)
    return torch.linspace(0, numel - 1, steps=count, dtype=torch.float64).round().long()


def backbone_fingerprint(
    backbone: nn.Module, engine: Engine, skip_names: Iterable[str] = ()
) -> str | None:
    """Hex fingerprint of ``backbone``'s own parameters, or ``None`` if any is on ``meta``.

    Args:
        backbone: the model; parameters of attached deltas are never part of it.
        engine: answers logical shapes and samples of sharded parameters.
        skip_names: canonical names left out (backbone parameters a delta checkpoint carries).
    """
    engine.settle(backbone)
    skip = set(skip_names)
    delta_params = {id(p) for m in delta_modules(backbone).values() for p in m.parameters()}
    digest = hashlib.sha256()
    for name, param in sorted(canonical_parameters(backbone).items()):
        if name in skip or id(param) in delta_params:
            continue
        shape = engine.logical_shape(param)
        digest.update(f"{name}:{tuple(shape)};".encode())
        if shape.numel() == 0:
            continue
        values = engine.sample(param, sample_positions(shape.numel()))
        if values is None:
            return None
        digest.update(values.to(torch.bfloat16).to(torch.float32).numpy().tobytes())
    return digest.hexdigest()
