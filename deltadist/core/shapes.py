"""Logical shapes of sites, without running the model.

Shapes come from, in order: module attributes (``in_features``), the engine's logical shape of a
parameter (ZeRO-3 keeps ``(0,)`` locally and the real shape elsewhere; FSDP keeps a DTensor whose
global shape is the real one), and propagation of meta tensors through the module with
``torch.func.functional_call`` (no real compute, no gather, works on a 70B model on ``meta``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call

from deltadist.addressing.facts import weight_is_transposed
from deltadist.addressing.linear import is_linear_module
from deltadist.core.delta_module import DeltaModule
from deltadist.engines import Engine
from deltadist.errors import SiteError

if TYPE_CHECKING:
    from deltadist.addressing.select import Site


HALF_DTYPES = (torch.float16, torch.bfloat16)


def site_placement(module: nn.Module, delta_dtype: str = "site") -> tuple[torch.device, torch.dtype]:
    """Device and dtype for new delta parameters at ``module``.

    The device is that of the site's first floating parameter. The dtype follows ``delta_dtype``
    (a config's field): ``"site"`` takes the site's; ``"auto"`` the site's, except float32 on
    float16/bfloat16 sites -- small trainable tensors in half precision lose their updates
    (AdamW's ``eps=1e-8`` is 0 in float16, so the first step divides by zero); a dtype name forces
    that dtype. Delta modules cast at the site boundary, so the backbone keeps running in its dtype.
    """
    device, dtype = torch.device("cpu"), torch.get_default_dtype()
    weight = getattr(module, "weight", None)
    first = weight if isinstance(weight, torch.Tensor) else next(
        (p for p in module.parameters() if p.is_floating_point()), None)
    if first is not None and first.is_floating_point():
        device, dtype = first.device, first.dtype
    if delta_dtype == "auto":
        return device, torch.float32 if dtype in HALF_DTYPES else dtype
    if delta_dtype == "site":
        return device, dtype
    return device, getattr(torch, delta_dtype)


def linear_features(module: nn.Module, engine: Engine) -> tuple[int, int] | None:
    """``(in_features, out_features)`` if ``module`` maps ``[..., in] -> [..., out]`` linearly.

    Recognises ``nn.Linear`` and anything with the same attributes, transformers' ``Conv1D``
    (weight stored ``[in, out]``), and otherwise any module with one 2-D weight whose meta
    propagation maps ``[1, in]`` to ``[1, out]``.
    """
    in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(in_f, int) and isinstance(out_f, int):
        return in_f, out_f
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    shape = engine.logical_shape(weight)
    if len(shape) != 2:
        return None
    if weight_is_transposed(module):
        return int(shape[0]), int(shape[1])
    for in_dim in dict.fromkeys((int(shape[1]), int(shape[0]))):
        out = meta_output(module, engine, torch.Size([1, in_dim]), weight.dtype)
        if out is not None and len(out) == 2 and out[0] == 1:
            return in_dim, int(out[1])
    return None


def output_features(module: nn.Module, engine: Engine) -> int | None:
    """Size of the last dimension of ``module``'s output, for modules that keep it fixed.

    Linear-like modules give ``out_features``; norms give the size of their 1-D weight.
    """
    features = linear_features(module, engine)
    if features is not None:
        return features[1]
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and len(engine.logical_shape(weight)) == 1:
        return int(engine.logical_shape(weight)[0])
    return None


def site_widths(site: "Site", engine: Engine) -> tuple[int, int]:
    """``(input width, output width)`` of a site's hidden states, from attributes and logical shapes.

    A linear layer gives its features, a norm its weight's size; a block (an attention or
    feed-forward module) is read from its linear layers in registration order -- the first one
    takes the block's input, the last one makes its output -- as in every supported family.
    Delta modules already attached inside are not part of the block.

    Raises:
        SiteError: the width cannot be told (no linear layer, no 1-D weight).
    """
    module = site.module
    features = linear_features(module, engine)
    if features is not None:
        return features
    width = output_features(module, engine)
    if width is not None:
        return width, width
    inside = [m for m in _backbone_descendants(module) if is_linear_module(m)]
    first = linear_features(inside[0], engine) if inside else None
    last = linear_features(inside[-1], engine) if inside else None
    if first is None or last is None:
        raise SiteError(
            f"Cannot tell the hidden-state width at {site.name!r} ({type(module).__name__}): it is "
            "not a linear layer or a norm and holds no linear layer. Point modified_modules at a "
            "linear layer, a norm, or an attention / feed-forward block."
        )
    return first[0], last[1]


def _backbone_descendants(module: nn.Module) -> list[nn.Module]:
    """``module``'s submodules in registration order, skipping delta modules and their insides."""
    found: list[nn.Module] = []
    for child in module.children():
        if isinstance(child, DeltaModule):
            continue
        found.append(child)
        found.extend(_backbone_descendants(child))
    return found


def meta_output(
    module: nn.Module, engine: Engine, input_shape: torch.Size, dtype: torch.dtype
) -> torch.Size | None:
    """Output shape of ``module`` on a meta input of ``input_shape``; ``None`` if it rejects it.

    Every parameter and buffer is replaced by a meta tensor of its logical shape for the call,
    so nothing is computed, gathered or changed.
    """
    substitutes = {
        name: torch.empty(engine.logical_shape(t), dtype=t.dtype, device="meta")
        for name, t in [*module.named_parameters(), *module.named_buffers()]
    }
    probe = torch.empty(input_shape, dtype=dtype, device="meta")
    try:
        out = functional_call(module, substitutes, (probe,))
    # Why broad: an arbitrary module rejects a wrong input shape with whatever error its code
    # raises (RuntimeError, ValueError, IndexError...); any of them just means "not this shape".
    except Exception:  # noqa: BLE001
        return None
    return out.shape if isinstance(out, torch.Tensor) else None
