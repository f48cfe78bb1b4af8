"""What the sharding engines wrap: the repeated blocks of a model (one FSDP unit each)."""

from __future__ import annotations

from torch import nn


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: children of a ``ModuleList`` whose items all share one class."""
    blocks: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            if len({type(child) for child in module}) == 1:
                blocks.extend(module)
    return blocks
