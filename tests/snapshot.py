"""Exact snapshots of a model's structure, used to prove a failed or undone change left no trace."""

from __future__ import annotations

import torch
from torch import nn

_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
"""Every kind of module hook deltadist could leave behind (forward and state-dict hooks)."""


def snapshot(model: nn.Module) -> dict[str, object]:
    """Everything attach/detach/freeze could change: modules, parameters, ``requires_grad``,
    forward and state-dict hooks, state-dict keys."""
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "params": [(n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()],
        "values": {n: p.detach().clone() for n, p in model.named_parameters()},
        "hooks": [
            (n, *(len(getattr(m, d)) for d in _HOOK_DICTS)) for n, m in model.named_modules()
        ],
        "state_dict_keys": list(model.state_dict().keys()),
    }


def assert_same_snapshot(before: dict[str, object], after: dict[str, object], values: bool = True) -> None:
    """Equal snapshots (``values=False``: parameter values may differ, e.g. a trained head)."""
    for key in ("modules", "params", "hooks", "state_dict_keys"):
        assert before[key] == after[key], f"{key} changed"
    values_before, values_after = before["values"], after["values"]
    assert values_before.keys() == values_after.keys()
    if values:
        for name, value in values_before.items():
            assert torch.equal(value, values_after[name]), f"{name} changed"
