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

Hooks are small objects (:class:`SiteHook`), not closures: they find their delta as
``module.<child_name>`` and its per-call state (mixed-batch rows, a span's input) on the delta
module's ``call_state``, so a ``copy.deepcopy`` or a pickle of the backbone runs its own copy of
the delta, and ``torch.compile`` sees module state, not a closure or a context variable. Hidden
states are the ``hidden_states`` keyword if given, else the first positional argument, else the
first tensor keyword; outputs are a tensor or a tuple/list whose first item is the hidden states.
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


class SiteHook:
    """A hook of one delta on its site: it finds the delta as the site's child ``child_name`` and
    holds nothing else but names (for its errors), so a deep copy or a pickle of the model carries
    working hooks of its own, and ``torch.compile`` traces plain module attribute reads."""

    def __init__(self, att: "Attachment") -> None:
        self.child_name, self.label = att.child_name, f"{att.base_name} at {att.site_name!r}"
        self.site_class = type(att.site).__name__


class _AddParallel(SiteHook):
    """``y + delta(x)`` on the delta's rows; in a mixed batch, one product for a site's group."""

    def __call__(self, site: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        delta = site._modules[self.child_name]
        group = group_of(delta)
        if group == ():  # a mixed batch whose group leader adds this delta's share: nothing to do
            return None
        x = hidden_input(args, kwargs, self.label)
        if group is not None:  # a mixed batch: one product for the deltas of this site
            return map_hidden(output, lambda y: add_group(site, group, y, x), self)
        return map_hidden(output, lambda y: add_on_rows(y, delta, x, site), self)


class _ApplyAfter(SiteHook):
    """``delta(y)`` on the site's output, on the delta's rows."""

    def __call__(self, site: nn.Module, args: tuple, output: Any) -> Any:
        delta = site._modules[self.child_name]
        return map_hidden(output, lambda y: apply_on_rows(delta, y), self)


class _ApplyBefore(SiteHook):
    """``delta(x)`` on the site's input, on the delta's rows."""

    def __call__(self, site: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        delta = site._modules[self.child_name]
        if HIDDEN_STATES_KEY in kwargs or not args:
            key = hidden_key(kwargs, self.label)
            return args, {**kwargs, key: apply_on_rows(delta, kwargs[key])}
        return (map_hidden(args[0], lambda x: apply_on_rows(delta, x), self), *args[1:]), kwargs


class _CaptureSpanInput(SiteHook):
    """At a span's start: hands the input to the delta (its ``call_state``) for the site's hook.
    The start module is not the delta's parent, so this hook keeps the delta itself (a module of
    the model: a deep copy or pickle of the model maps it to the copy's)."""

    def __init__(self, att: "Attachment") -> None:
        super().__init__(att)
        self.delta = att.delta

    def __call__(self, start: nn.Module, args: tuple, kwargs: dict) -> None:
        self.delta.call_state.pending = hidden_input(args, kwargs, self.label)


class _AddSpan(SiteHook):
    """At a span's site: ``y + delta(x_start)`` on the delta's rows."""

    def __call__(self, site: nn.Module, args: tuple, output: Any) -> Any:
        delta = site._modules[self.child_name]
        x, delta.call_state.pending = delta.call_state.pending, None
        return map_hidden(output, lambda y: add_on_rows(y, delta, x), self)


class Parallel(Mechanism):
    """``y = f(x) + delta(x)``."""

    name = "parallel"

    def wire(self, att: "Attachment", module: nn.Module) -> list[RemovableHandle]:
        return [module.register_forward_hook(_AddParallel(att), with_kwargs=True)]


class After(Mechanism):
    """``y = delta(f(x))``, in insertion order."""

    name = "after"

    def wire(self, att: "Attachment", module: nn.Module) -> list[RemovableHandle]:
        return [module.register_forward_hook(_ApplyAfter(att))]


class Before(Mechanism):
    """``y = f(delta(x))``; the delta added last sees the input first."""

    name = "before"

    def wire(self, att: "Attachment", module: nn.Module) -> list[RemovableHandle]:
        return [module.register_forward_pre_hook(_ApplyBefore(att), with_kwargs=True, prepend=True)]


class Span(Mechanism):
    """``delta(x_start)`` added to the site's output, ``x_start`` being the input of ``att.start``.

    The start module's pre-hook hands its input to the site's hook through the delta's call state
    (not stored on any backbone module, so state dicts are untouched); the site's hook takes it
    out again.
    """

    name = "span"

    def modules(self, att: "Attachment") -> tuple[nn.Module, ...]:
        if att.start is None:
            raise SiteError(f"{att.base_name} at {att.site_name!r} is a span without a start module.")
        return (att.start, att.site) if att.start is not att.site else (att.site,)

    def wire(self, att: "Attachment", module: nn.Module) -> list[RemovableHandle]:
        handles = []
        if module is att.start:
            handles.append(module.register_forward_pre_hook(_CaptureSpanInput(att), with_kwargs=True))
        if module is att.site:
            handles.append(module.register_forward_hook(_AddSpan(att)))
        return handles


PARALLEL, AFTER, BEFORE, SPAN = Parallel(), After(), Before(), Span()


def add_on_rows(y: torch.Tensor, delta: nn.Module, x: torch.Tensor,
                site: nn.Module | None = None) -> torch.Tensor:
    """``y + delta(x)``, on the rows ``delta`` serves in a mixed batch (all rows outside one); a
    delta that reads its site's output (DoRA) is called as ``delta(x, y, site)``.
    Shapes: ``x (batch, ..., d_in)``, ``y (batch, ..., d_out)``."""
    rows = rows_for(delta, x.shape[0], x.device)
    if rows is None or rows.numel() == x.shape[0]:  # every row (rows are distinct): no gathers
        return y + _update(delta, x, y, site)
    if not rows.numel():
        return y
    return y.index_add(0, rows, _update(delta, x, y, site, rows).to(y.dtype))


def _update(delta: nn.Module, x: torch.Tensor, y: torch.Tensor, site: nn.Module | None,
            rows: torch.Tensor | None = None) -> torch.Tensor:
    """``delta``'s update on ``rows`` of ``x`` (all if ``None``); the same rows of ``y`` are
    gathered only for a delta that reads them."""
    if rows is not None:
        x = x.index_select(0, rows)
    if not delta.reads_site_output:
        return delta(x)
    return delta(x, y if rows is None else y.index_select(0, rows), site)


def add_group(site: nn.Module, group: tuple[str, ...], y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` plus the update of every delta in ``group`` (child names of ``site``, at least one) on
    its own rows, computed at once by the deltas' ``grouped_update``."""
    deltas = [site._modules[name] for name in group]
    members = [(delta, rows_for(delta, x.shape[0], x.device)) for delta in deltas]
    return y + type(deltas[0]).grouped_update(x, members).to(y.dtype)


def apply_on_rows(delta: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``delta(x)`` on the rows ``delta`` serves in a mixed batch, the other rows as they are."""
    rows = rows_for(delta, x.shape[0], x.device)
    if rows is None or rows.numel() == x.shape[0]:
        return delta(x)
    if not rows.numel():
        return x
    return x.index_copy(0, rows, delta(x.index_select(0, rows)).to(x.dtype))


def hidden_key(kwargs: dict, label: str) -> str:
    """The keyword that carries the hidden states: ``hidden_states``, else the first tensor."""
    if isinstance(kwargs.get(HIDDEN_STATES_KEY), torch.Tensor):
        return HIDDEN_STATES_KEY
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return key
    raise SiteError(f"{label} was called without a tensor input; it needs the hidden states as the "
                    "first argument.")


def hidden_input(args: tuple, kwargs: dict, label: str) -> torch.Tensor:
    """The hidden states a module was called with (``label`` names the delta in errors)."""
    if HIDDEN_STATES_KEY in kwargs or not args:
        return kwargs[hidden_key(kwargs, label)]
    return args[0]


def map_hidden(value: Any, fn: Callable[[torch.Tensor], torch.Tensor], hook: SiteHook) -> Any:
    """Apply ``fn`` to the hidden states: the tensor itself or the first item of a tuple."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return type(value)([fn(value[0]), *value[1:]])
    raise SiteError(
        f"{hook.label} ({hook.site_class}) got a "
        f"{type(value).__name__}; it needs a tensor or a tuple whose first item is the hidden "
        "states. Point modified_modules at a module that returns hidden states."
    )
