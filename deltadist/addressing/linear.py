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


def parameter_sites(modules: dict[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """``"<module>.<parameter>"`` -> ``(module name, parameter name)`` for every 2-D or 3-D
    parameter a module that is not a linear layer holds itself: fused experts
    (``experts.gate_up_proj: [experts, out, in]``) and routers (``gate.weight: [experts, hidden]``)
    of mixture-of-experts blocks, which LoRA can target as parameters (PEFT's ``target_parameters``).
    Linear layers are addressed as modules; embeddings' and norms' parameters are listed too (a
    pattern must name them to select them; only 3-D ones count as linear for ``"all-linear"``)."""
    sites: dict[str, tuple[str, str]] = {}
    for name, module in modules.items():
        if not name or is_linear_module(module):
            continue
        for leaf, param in module._parameters.items():
            if isinstance(param, torch.Tensor) and param.dim() in (2, 3):
                sites[f"{name}.{leaf}"] = (name, leaf)
    return sites


def is_fused_experts(param: torch.Tensor) -> bool:
    """Whether a parameter site's tensor is a stack of expert weights (``[experts, out, in]``)."""
    return param.dim() == 3
