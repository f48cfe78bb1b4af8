"""Attaching delta modules to sites: child modules plus forward hooks, nothing else.

A delta is registered as a child module of its site (so engines see, shard and gather it like any
other parameter, and its state-dict keys are new keys beside the untouched backbone keys) and
wired in with forward (pre-)hooks whose handles we keep. Nothing reassigns ``forward`` or
``state_dict`` on an instance: ZeRO-3, FSDP and ``torch.compile`` rely on ``__call__`` running.

Composition on one site follows OpenDelta's order rules, whatever order deltas are detached and
re-attached in: every time a site changes, its hooks are re-registered in insertion order, so

* ``AFTER`` deltas run in insertion order on the site's output;
* ``BEFORE`` deltas run in reverse insertion order on its input (the last added sees the input
  first);
* ``PARALLEL`` deltas add ``delta(input)`` to the output at their place in that order.

An attachment may also be *suspended* (``delta.disabled()``): its child stays, its hooks are off.
Every re-wiring tells ``torch.compile`` (see :mod:`deltadist.compiled`), so a compiled model runs
the new composition on its next call.
"""

from __future__ import annotations

import enum
import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from deltadist.compiled import refresh_compiled_graphs
from deltadist.delta_module import DeltaModule
from deltadist.errors import SiteError


class Mechanism(enum.Enum):
    """How a delta is wired into its site ``f``."""

    PARALLEL = "parallel"
    """``y = f(x) + delta(x)`` (LoRA, parallel adapters)."""
    AFTER = "after"
    """``y = delta(f(x))`` (adapters, BitFit's added bias)."""
    BEFORE = "before"
    """``y = f(delta(x))``."""


_order = itertools.count()


@dataclass(eq=False)
class Attachment:
    """One delta module on one site, and whether it is currently attached."""

    site: nn.Module
    site_name: str
    delta: DeltaModule
    base_name: str
    """The delta kind's child name (``"lora"``); the registered name may carry a ``_1`` suffix."""
    mechanism: Mechanism | None
    """``None``: the delta only holds parameters (shared by other sites' deltas); no hooks."""
    order: int = field(default_factory=lambda: next(_order))
    child_name: str = ""
    attached: bool = False
    suspended: bool = False
    """Attached, but its hooks are off (``delta.disabled()``)."""


_SITES: "weakref.WeakKeyDictionary[nn.Module, list[Attachment]]" = weakref.WeakKeyDictionary()
_HANDLES: "weakref.WeakKeyDictionary[nn.Module, list[RemovableHandle]]" = weakref.WeakKeyDictionary()


def attachments_on(site: nn.Module) -> list[Attachment]:
    """The attachments recorded on ``site`` (attached or not), in insertion order."""
    return list(_SITES.get(site, []))


def attach(att: Attachment) -> None:
    """Register ``att.delta`` as a child of its site and (re)wire the site's hooks."""
    if att.attached:
        return
    if not att.child_name:
        att.child_name = _free_child_name(att.site, att.base_name)
    elif att.child_name in att.site._modules or hasattr(att.site, att.child_name):
        raise SiteError(
            f"Cannot re-attach {att.base_name!r} at {att.site_name!r}: the site now has another "
            f"attribute named {att.child_name!r}. Remove it, or detach the delta that owns it."
        )
    att.site.add_module(att.child_name, att.delta)
    att.attached = True
    slots = _SITES.setdefault(att.site, [])
    if att not in slots:
        slots.append(att)
    _rewire(att.site)


def detach(att: Attachment) -> None:
    """Remove ``att.delta`` from its site; the site's module tree and hooks are as before it."""
    if not att.attached:
        return
    del att.site._modules[att.child_name]
    att.attached = False
    _rewire(att.site)


def suspend(att: Attachment, suspended: bool = True) -> None:
    """Turn ``att``'s hooks off (or back on) without touching the module tree or parameters."""
    if att.suspended == suspended:
        return
    att.suspended = suspended
    if att.attached:
        _rewire(att.site)


def forget(att: Attachment) -> None:
    """Detach and drop the record (used to roll back a failed attach)."""
    detach(att)
    slots = _SITES.get(att.site, [])
    if att in slots:
        slots.remove(att)
    if not slots:
        _SITES.pop(att.site, None)


def _free_child_name(site: nn.Module, base: str) -> str:
    reserved = {a.child_name for a in _SITES.get(site, [])}
    for i in itertools.count():
        name = base if i == 0 else f"{base}_{i}"
        if name not in reserved and name not in site._modules and not hasattr(site, name):
            return name
    raise AssertionError("itertools.count() never ends")  # for type checkers: no implicit None


def _rewire(site: nn.Module) -> None:
    for handle in _HANDLES.pop(site, []):
        handle.remove()
    live = sorted(
        (a for a in _SITES.get(site, []) if a.attached and not a.suspended and a.mechanism),
        key=lambda a: a.order,
    )
    handles = []
    for att in live:
        if att.mechanism is Mechanism.BEFORE:
            handles.append(
                site.register_forward_pre_hook(_before_hook(att), with_kwargs=True, prepend=True)
            )
        elif att.mechanism is Mechanism.AFTER:
            handles.append(site.register_forward_hook(_after_hook(att)))
        else:
            handles.append(site.register_forward_hook(_parallel_hook(att), with_kwargs=True))
    if handles:
        _HANDLES[site] = handles
    refresh_compiled_graphs()


# Hooks find their delta as ``module.<child_name>`` rather than closing over the object, so a
# ``copy.deepcopy`` of the backbone runs its own copy of the delta.
def _before_hook(att: Attachment) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        delta = module._modules[att.child_name]
        if args:
            return (_map_hidden(args[0], delta, att), *args[1:]), kwargs
        key = _first_tensor_key(kwargs, att)
        return args, {**kwargs, key: delta(kwargs[key])}

    return hook


def _after_hook(att: Attachment) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        return _map_hidden(output, module._modules[att.child_name], att)

    return hook


def _parallel_hook(att: Attachment) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden = args[0] if args else kwargs[_first_tensor_key(kwargs, att)]
        update = module._modules[att.child_name](hidden)
        return _map_hidden(output, lambda y: y + update, att)

    return hook


def _map_hidden(value: Any, fn: Callable[[torch.Tensor], torch.Tensor], att: Attachment) -> Any:
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


def _first_tensor_key(kwargs: dict, att: Attachment) -> str:
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return key
    raise SiteError(
        f"{att.base_name} at {att.site_name!r} was called without a tensor input; "
        "it needs the hidden states as the first argument."
    )


def delta_modules(root: nn.Module) -> dict[str, DeltaModule]:
    """Every attached delta module under ``root`` by its (raw) module name, of any delta object.

    For what *one* delta owns, ask its record (:class:`deltadist.record.DeltaRecord`); this is for
    keeping every delta out of the backbone (fingerprint, site selection, weight loading).
    """
    return {n: m for n, m in root.named_modules() if isinstance(m, DeltaModule)}


def delta_parameter_ids(root: nn.Module) -> set[int]:
    """``id()`` of every parameter of every delta module under ``root``."""
    return {id(p) for m in delta_modules(root).values() for p in m.parameters()}
