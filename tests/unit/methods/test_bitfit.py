"""BitFit's selection: broadcast into selected modules, minus excludes and other deltas' modules."""

from __future__ import annotations

import torch
from torch import nn

from deltadist import BitFitModel
from deltadist.core.attach import Attachment, attach
from deltadist.core.delta_module import DeltaModule
from deltadist.mechanisms.hooks import AFTER
from tests.tiny import build_tiny


def test_exclude_modules_applies_inside_a_selected_module() -> None:
    model = build_tiny("bert", "cls")
    delta = BitFitModel(model, modified_modules=["0.attention"], exclude_modules=["LayerNorm", "self.key"])
    assert delta.sites == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.value",
        "bert.encoder.layer.0.attention.output.dense",
    ]


class Bottleneck(DeltaModule):
    """An adapter-like delta with linear layers of its own."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(width, 2), nn.Linear(2, width)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.down(hidden))


def test_bitfit_never_reaches_into_another_deltas_modules() -> None:
    model = build_tiny("bert", "cls")
    site = model.bert.encoder.layer[0].attention.output
    attach(Attachment(site=site, site_name="bert.encoder.layer.0.attention.output",
                      delta=Bottleneck(32), base_name="adapter", mechanism=AFTER))
    delta = BitFitModel(model, modified_modules=["0.attention"])
    assert delta.sites and not any(".adapter" in s for s in delta.sites)
    assert "bert.encoder.layer.0.attention.output.dense" in delta.sites
