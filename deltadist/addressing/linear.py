"""Which modules are linear layers, told from their attributes alone (no forward, no gather)."""

from __future__ import annotations

import torch
from torch import nn

from deltadist.addressing.facts import weight_is_transposed


def is_linear_module(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer by its attributes (``nn.Linear``, transformers' ``Conv1D``).

    A cheap structural test for addressing (``"all-linear"``);
    :func:`deltadist.core.shapes.linear_features` also finds linear-like modules by meta propagation.
    """
    if isinstance(module, nn.Linear):
        return True
    in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(in_f, int) and isinstance(out_f, int):
        return True
    return weight_is_transposed(module) and isinstance(getattr(module, "weight", None), torch.Tensor)
