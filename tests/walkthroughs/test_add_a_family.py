"""Walkthrough: add a model family. (A home-made transformer, from public names only.)

A family is data: a ``StructureMap`` says which of its module paths play which role of the common
structure (``encoder.block.$.attn.q``...). Registered, it gives every method its default places on
the family's models (LoRA's ``attn.q`` and ``attn.v``, adapters' ``attn.proj`` and ``ff.w2``) and
lets users address modules by role. A model names its family by ``config.model_type``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from deltadist import AdapterModel, LoraModel, StructureMap, register_structure_map

TOYFORMER = StructureMap(
    family="toyformer",
    model_types=("toyformer",),
    roles={
        "blocks.$.mix": "encoder.block.$.attn",
        "blocks.$.mix.wq": "encoder.block.$.attn.q",
        "blocks.$.mix.wk": "encoder.block.$.attn.k",
        "blocks.$.mix.wv": "encoder.block.$.attn.v",
        "blocks.$.mix.wo": "encoder.block.$.attn.proj",
        "blocks.$.mlp.up": "encoder.block.$.ff.w1",
        "blocks.$.mlp.down": "encoder.block.$.ff.w2",
    },
)


class Mix(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.wq(x) @ self.wk(x).transpose(-1, -2) / x.shape[-1] ** 0.5
        return self.wo(scores.softmax(-1) @ self.wv(x))


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mix = Mix(width)
        self.mlp = nn.Sequential()
        self.mlp.up, self.mlp.act = nn.Linear(width, 2 * width), nn.GELU()
        self.mlp.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(x)
        return x + self.mlp(x)


class Toyformer(nn.Module):
    def __init__(self, width: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="toyformer")
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_a_registered_family_gets_every_default_by_role() -> None:
    register_structure_map(TOYFORMER)
    torch.manual_seed(0)
    model = Toyformer()
    x = torch.randn(2, 5, 16)
    before = model(x)

    lora = LoraModel(model, lora_r=2)  # default roles: attn.q and attn.v
    assert lora.sites == [f"blocks.{i}.mix.{w}" for i in range(2) for w in ("wq", "wv")]
    adapter = AdapterModel(model, bottleneck_dim=4)  # default roles: attn.proj and ff.w2
    assert adapter.sites == [f"blocks.{i}.{m}" for i in range(2) for m in ("mix.wo", "mlp.down")]
    by_role = LoraModel(model, modified_modules=["ff.w1"], common_structure=True, lora_r=2)
    assert by_role.sites == ["blocks.0.mlp.up", "blocks.1.mlp.up"]
    torch.testing.assert_close(model(x), before)  # fresh LoRA and adapters start as no-ops
