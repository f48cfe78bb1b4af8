"""Parameter offsets: a delta that changes a *parameter* of its site for the duration of each
call, ``W -> W + delta`` (LoRA on fused expert weights, ``experts.gate_up_proj: [experts, out,
in]``, which the module reads as ``self.gate_up_proj[e]`` inside its own forward: no call of a
sub-module to hook, so :data:`~deltadist.mechanisms.hooks.PARALLEL` cannot reach it).

A forward pre-hook puts ``delta(W)`` (``W`` plus the update) into the site's instance ``__dict__``
under the parameter's name: an instance attribute wins over ``nn.Module.__getattr__``, so the
module's forward (and any experts implementation transformers dispatches to) reads the sum, while
``_parameters``, ``state_dict``, ``named_parameters``, FSDP and ZeRO still see the real parameter:
keys unchanged, nothing written into the backbone. A forward hook registered with
``always_call=True`` removes the shadow again, even when the forward raises. Several deltas on one
parameter add up (each pre-hook adds to what is there).

The hooks find the delta as the site's child and its parameter name on it (``parameter_name``),
as every mechanism. When the site's parameter is not whole when the pre-hook runs (ZeRO-3's own
pre-forward hook, registered at ``deepspeed.initialize`` after ours, has not fetched it yet; or the
site is called by itself inside a ZeRO leaf module, whose hook would have fetched it), the engine
gathers it and the delta's parameters for the sum (:meth:`~deltadist.engines.base.Engine.whole`).

The offset is one weight for the whole call: in a :func:`~deltadist.mixed_batch` block a delta of
this kind may serve every row or none, not some (it is refused, naming the rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from deltadist.core.mechanism import Mechanism
from deltadist.engines import detect_engine
from deltadist.errors import DeltaError
from deltadist.mechanisms.hooks import SiteHook

if TYPE_CHECKING:
    from deltadist.core.attach import Attachment


def serves_call(delta: nn.Module) -> bool:
    """Whether ``delta`` applies to this call: always outside a mixed batch; inside one, if it
    serves every row (``True``) or none (``False``).

    Raises:
        DeltaError: it serves some rows only (a parameter offset changes the weight of every row).
    """
    state = delta.call_state
    if state.rows is None:
        return True
    served = state.rows.numel()
    if served in (0, state.listed):
        return served > 0
    raise DeltaError(
        f"mixed_batch: a {type(delta).__name__} delta changes the parameter {delta.parameter_name!r} "
        f"for the whole call, so it can serve every row of a batch or none, not {served} of "
        f"{state.listed}. Run its rows in a batch of their own, or use LoRA on expert modules "
        "(transformers 4.5x layouts), which routes by rows."
    )


class _Shadow(SiteHook):
    """Before the call: ``site.__dict__[name] = delta(W)`` (``W``: what is there already)."""

    def __call__(self, site: nn.Module, args: tuple) -> None:
        delta = site._modules[self.child_name]
        if not serves_call(delta):
            return
        name = delta.parameter_name
        current = site.__dict__.get(name)
        if current is not None:  # another delta's offset of the same parameter: add to it
            site.__dict__[name] = delta(current)
            return
        param = site._parameters[name]
        if tuple(param.shape) == delta.weight_shape:
            site.__dict__[name] = delta(param)
            return
        with detect_engine(site).whole([param, *delta.parameters()]):  # partitioned, not fetched yet
            site.__dict__[name] = delta(param)


class _Unshadow(SiteHook):
    """After the call (also when it raised): the site reads its own parameter again."""

    def __call__(self, site: nn.Module, args: tuple, output: Any) -> None:
        delta = site._modules.get(self.child_name)
        if delta is not None:
            site.__dict__.pop(delta.parameter_name, None)


class ParameterOffset(Mechanism):
    """``W + delta`` in place of a parameter ``W`` of the site, for the duration of each call."""

    name = "parameter_offset"

    def wire(self, att: "Attachment", module: nn.Module) -> list[RemovableHandle]:
        return [module.register_forward_pre_hook(_Shadow(att)),
                module.register_forward_hook(_Unshadow(att), always_call=True)]


OFFSET = ParameterOffset()

