"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltadist import LoraModel
from tests.tiny import build_tiny, logits_of, tiny_inputs


@pytest.fixture
def saved(tmp_path: Path):
    """A BERT classifier with a trained-looking LoRA and head, saved.

    Returns:
        ``(model, delta, checkpoint directory, the tuned logits on tiny_inputs("bert"))``.
    """
    model = build_tiny("bert", "cls")
    delta = LoraModel(backbone_model=model, lora_r=4)
    with torch.no_grad():
        for param in delta.parameters():
            param.normal_(0, 0.1)
    directory = tmp_path / "delta"
    delta.save_finetuned(directory)
    return model, delta, directory, logits_of(model, tiny_inputs("bert"))
