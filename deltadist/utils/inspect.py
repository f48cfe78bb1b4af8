"""Parameter statistics of a model and of an optimizer (OpenDelta's ``opendelta.utils.inspect``).

Counts are logical: a parameter an engine shards (FSDP, ZeRO-3) counts whole, shared parameters
once. Unlike OpenDelta's, :func:`inspect_optimizer_statistics` returns every param group (OpenDelta
returned the last one only), and tells delta parameters from the backbone's when given the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltadist.core.attach import delta_parameter_ids
from deltadist.engines import detect_engine
from deltadist.interactive.visualize import parameter_summary


def inspect_module_statistics(module: nn.Module, verbose: bool = True) -> dict[str, Any]:
    """``total_parameters``, ``trainable_parameters``, ``delta_parameters`` (every delta's,
    trained task-head copies included: what deltas save), their ratios to the total, and the GPU
    memory allocated now and at its peak (``cudamem``, ``maxcudamem``: GiB over every GPU; 0
    without one). ``verbose`` prints them."""
    engine = detect_engine(module)
    summary = parameter_summary(module, engine, delta_ids=delta_parameter_ids(module))
    total = summary["total"]
    stats: dict[str, Any] = {
        "total_parameters": total,
        "trainable_parameters": summary["trainable"],
        "trainable_ratio": summary["trainable"] / total if total else 0.0,
        "delta_parameters": summary["delta"],
        "delta_ratio": summary["delta"] / total if total else 0.0,
        "cudamem": _gib(torch.cuda.memory_allocated),
        "maxcudamem": _gib(torch.cuda.max_memory_allocated),
    }
    if verbose:
        print(", ".join(f"{key}: {_shown(value)}" for key, value in stats.items()))
    return stats


def inspect_optimizer_statistics(optimizer: torch.optim.Optimizer, verbose: bool = True,
                                 model: nn.Module | None = None) -> dict[str, dict[str, Any]]:
    """Per param group (``param_group_<i>``): ``total_parameters``, ``trainable_parameters``
    (``requires_grad``), ``frozen_parameters`` (an optimizer holding frozen tensors steps nothing
    for them: usually a mistake), with ``model`` also ``delta_parameters`` and
    ``backbone_parameters``, and the group's settings (``lr``, ``weight_decay``, ...).
    ``verbose`` prints one line per group."""
    engine = detect_engine(model) if model is not None else None
    deltas = delta_parameter_ids(model) if model is not None else set()
    stats: dict[str, dict[str, Any]] = {}
    for index, group in enumerate(optimizer.param_groups):
        params = list(group["params"])
        sizes = [(engine.logical_shape(p).numel() if engine else p.numel(), p) for p in params]
        total = sum(n for n, _ in sizes)
        trainable = sum(n for n, p in sizes if p.requires_grad)
        stat: dict[str, Any] = {"total_parameters": total, "trainable_parameters": trainable,
                                "frozen_parameters": total - trainable,
                                "trainable_ratio": trainable / total if total else 0.0}
        if model is not None:
            stat["delta_parameters"] = sum(n for n, p in sizes if id(p) in deltas)
            stat["backbone_parameters"] = total - stat["delta_parameters"]
        stat.update({key: value for key, value in group.items() if key != "params"})
        stats[f"param_group_{index}"] = stat
    if verbose:
        for name, stat in stats.items():
            print(f"{name}: " + ", ".join(f"{key}: {_shown(value)}" for key, value in stat.items()))
    return stats


def _gib(measure: Any) -> float:
    if not torch.cuda.is_available():
        return 0.0
    return sum(measure(f"cuda:{device}") for device in range(torch.cuda.device_count())) / 1024 ** 3


def _shown(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else \
        f"{value:.6g}" if isinstance(value, float) else str(value)
