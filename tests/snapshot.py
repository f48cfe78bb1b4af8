"""Exact snapshots of a model's structure, used to prove a failed or undone change left no trace."""

from __future__ import annotations

import torch
from torch import nn


def snapshot(model: nn.Module) -> dict[str, object]:
    """Everything attach/detach could change: modules, parameters, flags, hooks, state-dict keys."""
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "params": [(n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()],
        "values": {n: p.detach().clone() for n, p in model.named_parameters()},
        "hooks": [
            (n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()
        ],
        "state_dict_keys": list(model.state_dict().keys()),
    }


def assert_same_snapshot(before: dict[str, object], after: dict[str, object]) -> None:
    for key in ("modules", "params", "hooks", "state_dict_keys"):
        assert before[key] == after[key], f"{key} changed"
    values_before, values_after = before["values"], after["values"]
    assert values_before.keys() == values_after.keys()
    for name, value in values_before.items():
        assert torch.equal(value, values_after[name]), f"{name} changed"
