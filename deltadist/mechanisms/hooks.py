"""Mechanisms: how a delta module is wired into the module(s) it modifies, with hooks only.

A mechanism is an object that, for one attachment, registers forward (pre-)hooks on each module
the attachment touches and returns their handles; :mod:`deltadist.core.attach` keeps the handles and
re-wires a module whenever its attachments change. Hooks see (and may rewrite) the call's
``(args, kwargs)`` and its output; they never reassign ``forward``.

* :data:`PARALLEL` -- ``y = f(x) + delta(x)`` (LoRA, parallel adapters);
* :data:`AFTER` -- ``y = delta(f(x))`` (adapters, BitFit's added bias);
* :data:`BEFORE` -- ``y = f(delta(x))``;
* :data:`SPAN` -- ``delta(x_start)`` added to the output of another module: the input of the
  attachment's ``start`` module, the output of its site (a parallel adapter beside a
  feed-forward block that is not one module: from ``ff.w1``'s input to ``ff.w2``'s output).

Hooks find their delta as ``module.<child_name>`` rather than closing over the object, so a
``copy.deepcopy`` of the backbone runs its own copy of the delta. Hidden states are the
``hidden_states`` keyword if given, else the first positional argument, else the first tensor
keyword; outputs are a tensor or a tuple/list whose first item is the hidden states.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from deltadist.core.mechanism import Mechanism
from deltadist.errors import SiteError
from deltadist.mechanisms.rows import group_of, rows_for

if TYPE_CHECKING:
    from deltadist.core.attach import Attachment

HIDDEN_STATES_KEY = "hidden_states"
"""The keyword transformers layers use for the hidden states."""


class Parallel(Mechanism):
    """``y = f(x) + delta(x)``."""

    name = "parallel"

    def wire(self, att: "Attachment", module: nn.Module) -> list[RemovableHandle]:
        def hook(site: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            x, group = hidden_input(args, kwargs, att), group_of(att)
            if group is not None:  # a mixed batch: one product for the deltas of this site
                return map_hidden(output, lambda y: add_group(site, group, y, x), att)
            delta = site._modules[att.child_name]
            return map_hidden(output, lambda y: add_on_rows(att, y, delta, x), att)

        return [module.register_forward_hook(hook, with_kwargs=True)]


class After(Mechanism):
    """``y = delta(f(x))``, in insertion order."""

    name = "after"

    def wire(self, att: "Attachment", module: nn.Module) -> list[RemovableHandle]:
        def hook(site: nn.Module, args: tuple, output: Any) -> Any:
            delta = site._modules[att.child_name]
            return map_hidden(output, lambda y: apply_on_rows(att, delta, y), att)

        return [module.register_forward_hook(hook)]


class Before(Mechanism):
    """``y = f(delta(x))``; the delta added last sees the input first."""

    name = "before"

    def wire(self, att: "Attachment", module: nn.Module) -> list[RemovableHandle]:
        def hook(site: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            delta = site._modules[att.child_name]
            if HIDDEN_STATES_KEY in kwargs or not args:
                key = hidden_key(kwargs, att)
                return args, {**kwargs, key: apply_on_rows(att, delta, kwargs[key])}
            return (map_hidden(args[0], lambda x: apply_on_rows(att, delta, x), att), *args[1:]), kwargs

        return [module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)]


class Span(Mechanism):
    """``delta(x_start)`` added to the site's output, ``x_start`` being the input of ``att.start``.

    The start module's pre-hook hands its input to the site's hook through a slot keyed by the
    attachment (not stored on any module, so a deep copy of the backbone stays independent and
    state dicts are untouched); the site's hook takes it out again.
    """

    name = "span"

    def modules(self, att: "Attachment") -> tuple[nn.Module, ...]:
        if att.start is None:
            raise SiteError(f"{att.base_name} at {att.site_name!r} is a span without a start module.")
        return (att.start, att.site) if att.start is not att.site else (att.site,)

    def wire(self, att: "Attachment", module: nn.Module) -> list[RemovableHandle]:
        handles = []
        if module is att.start:
            def capture(start: nn.Module, args: tuple, kwargs: dict) -> None:
                _SPAN_INPUTS[id(att)] = hidden_input(args, kwargs, att)

            handles.append(module.register_forward_pre_hook(capture, with_kwargs=True))
        if module is att.site:
            def add(site: nn.Module, args: tuple, output: Any) -> Any:
                delta, x = site._modules[att.child_name], _SPAN_INPUTS.pop(id(att))
                return map_hidden(output, lambda y: add_on_rows(att, y, delta, x), att)

            handles.append(module.register_forward_hook(add))
        return handles


PARALLEL, AFTER, BEFORE, SPAN = Parallel(), After(), Before(), Span()

_SPAN_INPUTS: dict[int, torch.Tensor] = {}
"""Inputs captured at a span's start, waiting for its site (one entry per running span)."""


def add_on_rows(att: "Attachment", y: torch.Tensor, delta: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``y + delta(x)``, on the rows ``att`` serves in a mixed batch (all rows outside one).
    Shapes: ``x (batch, ..., d_in)``, ``y (batch, ..., d_out)``."""
    rows = rows_for(att, x.shape[0], x.device)
    if rows is None or rows.numel() == x.shape[0]:  # every row (rows are distinct): no gathers
        return y + delta(x)
    if not rows.numel():
        return y
    return y.index_add(0, rows, delta(x.index_select(0, rows)).to(y.dtype))


def add_group(site: nn.Module, group: tuple["Attachment", ...], y: torch.Tensor,
              x: torch.Tensor) -> torch.Tensor:
    """``y`` plus the update of every delta in ``group`` on its own rows, computed at once by the
    deltas' ``grouped_update``; an empty group (its share is computed elsewhere) adds nothing."""
    if not group:
        return y
    members = [(site._modules[a.child_name], rows_for(a, x.shape[0], x.device)) for a in group]
    return y + type(members[0][0]).grouped_update(x, members).to(y.dtype)


def apply_on_rows(att: "Attachment", delta: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``delta(x)`` on the rows ``att`` serves in a mixed batch, the other rows as they are."""
    rows = rows_for(att, x.shape[0], x.device)
    if rows is None or rows.numel() == x.shape[0]:
        return delta(x)
    if not rows.numel():
        return x
    return x.index_copy(0, rows, delta(x.index_select(0, rows)).to(x.dtype))


def hidden_key(kwargs: dict, att: "Attachment") -> str:
    """The keyword that carries the hidden states: ``hidden_states``, else the first tensor."""
    if isinstance(kwargs.get(HIDDEN_STATES_KEY), torch.Tensor):
        return HIDDEN_STATES_KEY
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return key
    raise SiteError(
        f"{att.base_name} at {att.site_name!r} was called without a tensor input; "
        "it needs the hidden states as the first argument."
    )


def hidden_input(args: tuple, kwargs: dict, att: "Attachment") -> torch.Tensor:
    """The hidden states a module was called with."""
    if HIDDEN_STATES_KEY in kwargs or not args:
        return kwargs[hidden_key(kwargs, att)]
    return args[0]


def map_hidden(value: Any, fn: Callable[[torch.Tensor], torch.Tensor], att: "Attachment") -> Any:
    """Apply ``fn`` to the hidden states: the tensor itself or the first item of a tuple."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return type(value)([fn(value[0]), *value[1:]])
    raise SiteError(
        f"{att.base_name} at {att.site_name!r} ({type(att.site).__name__}) got a "
        f"{type(value).__name__}; it needs a tensor or a tuple whose first item is the hidden "
        "states. Point modified_modules at a module that returns hidden states."
    )
