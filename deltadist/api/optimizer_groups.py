"""A delta's parameters as optimizer groups: one group, or LoRA+'s two learning rates."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deltadist.errors import ConfigError

if TYPE_CHECKING:
    from deltadist.api.delta_base import DeltaBase


def param_groups(delta: "DeltaBase", lr: float, loraplus_lr_ratio: float = 1.0) -> list[dict[str, Any]]:
    """``delta``'s parameters in one group at ``lr``, or with LoRA+ (Hayou et al. 2024,
    https://arxiv.org/abs/2402.12354; ``loraplus_lr_ratio`` above 1) each ``lora_B`` and every 1-D
    parameter (DoRA magnitudes, kept biases) at ``lr * loraplus_lr_ratio``, as PEFT's
    ``create_loraplus_optimizer`` groups them:
    ``torch.optim.AdamW(delta.param_groups(1e-4, 16), weight_decay=0.01)``.

    Raises:
        ConfigError: a ratio that is not positive, or a ratio other than 1 for a delta that has no
            ``lora_B``.
    """
    if isinstance(loraplus_lr_ratio, bool) or not isinstance(loraplus_lr_ratio, (int, float)) \
            or not loraplus_lr_ratio > 0:
        raise ConfigError(f"loraplus_lr_ratio must be a positive number, got {loraplus_lr_ratio!r}.")
    named = list(delta.named_parameters())
    if loraplus_lr_ratio == 1:
        return [{"params": [p for _, p in named], "lr": lr}]
    if not any(name.endswith(".lora_B") for name, _ in named):
        raise ConfigError(f"LoRA+ (loraplus_lr_ratio={loraplus_lr_ratio}) sets the learning rate of LoRA's "
                          f"B matrices, and this {delta.delta_type} delta has none; leave the ratio at 1.")
    engine = delta.engine
    # 1-D by the logical shape: FSDP1 keeps every local piece flat.
    fast = {id(p) for name, p in named if name.endswith(".lora_B") or len(engine.logical_shape(p)) == 1}
    return [{"params": [p for _, p in named if id(p) not in fast], "lr": lr},
            {"params": [p for _, p in named if id(p) in fast], "lr": lr * loraplus_lr_ratio}]
