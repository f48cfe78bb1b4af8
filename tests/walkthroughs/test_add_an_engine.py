"""Walkthrough: add an engine. (A toy one that counts what it gathers, from public names only.)

An engine is one ``Engine`` subclass: its name, how it recognises a model it manages
(``claims``), how it wraps one (``wrap``) and starts a job's ranks (``launch``; the plain engine's
here), and how it reads, gathers and scatters tensors. ``@register_engine`` makes detection, the
training job's ``engine:`` key, ``setup_engine`` and ``wrap_model`` know it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file
from torch import nn

from deltadist import Engine, LoraModel, register_engine, wrap_model
from deltadist.engines import ENGINES, detect_engine, setup_engine

GATHERED: list[str] = []


class CountingEngine(Engine):
    """Plain single-process behaviour, noting every tensor it gathers."""

    name = "counting"

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        return getattr(model, "counted", False)

    @classmethod
    def wrap(cls, model: nn.Module, device: torch.device) -> nn.Module:
        model.counted = True
        return model.to(device)

    def gather(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        GATHERED.extend(params)
        return super().gather(params)


def test_a_new_engine_is_known_detected_and_asked_to_gather(tmp_path: Path) -> None:
    register_engine(CountingEngine)  # or @register_engine on the class
    assert list(ENGINES)[-1] == "counting"  # the most specific: detection asks it first
    setup = setup_engine("counting", environ={})
    assert (setup.name, setup.world_size) == ("counting", 1)

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert type(detect_engine(model)) is Engine
    delta = LoraModel(model, modified_modules=["0", "2"], lora_r=2)
    delta.freeze_module()
    runner = wrap_model(model, "counting", setup.device)
    assert runner is model and isinstance(delta.engine, CountingEngine)

    delta.save_finetuned(tmp_path / "delta")
    saved = load_file(tmp_path / "delta" / "delta.safetensors")
    assert sorted(GATHERED) == sorted(delta.state_dict()) == sorted(saved)
