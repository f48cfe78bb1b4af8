"""Helpers for checkpoint tests on tiny models (the tiny BERT classifier by default)."""

from __future__ import annotations

from pathlib import Path

import torch

from deltadist import AutoDeltaModel
from tests.tiny import build_tiny, logits_of, tiny_inputs


def change_every_parameter(delta) -> None:
    """Move all of the delta's trainable values, so a later save differs from the one on disk."""
    with torch.no_grad():
        for param in delta.parameters():
            param.add_(1.0)


def reloaded_logits(directory: Path, family: str = "bert", head: str = "cls") -> torch.Tensor:
    """Logits (on ``tiny_inputs(family)``) of a fresh tiny backbone after ``from_finetuned(directory)``."""
    fresh = build_tiny(family, head)
    AutoDeltaModel.from_finetuned(directory, backbone_model=fresh)
    return logits_of(fresh, tiny_inputs(family))
