"""Attaching delta modules to sites: child modules plus forward hooks, nothing else.

A delta is registered as a child module of its site (so engines see, shard and gather it like any
other parameter, and its state-dict keys are new keys beside the untouched backbone keys) and
wired in by its :mod:`mechanism <deltadist.mechanisms.hooks>` with forward (pre-)hooks whose handles we
keep. Nothing reassigns ``forward`` or ``state_dict`` on an instance: ZeRO-3, FSDP and
``torch.compile`` rely on ``__call__`` running.

Composition on one module follows OpenDelta's order rules, whatever order deltas are detached and
re-attached in: every time a module's attachments change, all its hooks are re-registered in
insertion order, so

* ``AFTER`` deltas run in insertion order on the site's output;
* ``BEFORE`` deltas run in reverse insertion order on its input (the last added sees the input
  first);
* ``PARALLEL`` (and ``SPAN``) deltas add ``delta(input)`` to the output at their place in that order.

An attachment may also be *suspended* (``delta.disabled()``): its child stays, its hooks are off.
Every re-wiring tells ``torch.compile`` (see :mod:`deltadist.core.compiled`), so a compiled model runs
the new composition on its next call.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field

from torch import nn
from torch.utils.hooks import RemovableHandle

from deltadist.addressing.names import walk_modules
from deltadist.core.compiled import refresh_compiled_graphs
from deltadist.core.delta_module import DeltaModule
from deltadist.core.mechanism import Mechanism
from deltadist.errors import SiteError

_order = itertools.count()


@dataclass(eq=False)
class Attachment:
    """One delta module on one site, and whether it is currently attached."""

    site: nn.Module
    site_name: str
    delta: DeltaModule
    base_name: str
    """The delta kind's child name (``"lora"``); the registered name may carry a ``_1`` suffix."""
    mechanism: Mechanism
    start: nn.Module | None = None
    """For a span: the module whose input the delta reads (the site is where it adds)."""
    order: int = field(default_factory=lambda: next(_order))
    child_name: str = ""
    attached: bool = False
    suspended: bool = False
    """Attached, but its hooks are off (``delta.disabled()``)."""


_ATTACHMENTS: "weakref.WeakKeyDictionary[nn.Module, list[weakref.ref[Attachment]]]" = weakref.WeakKeyDictionary()
"""Every module a delta touches (its site, a span's start) -> those attachments, held weakly: an
attachment refers to its modules, so a strong reference here would keep a dropped model alive
forever. Its record holds it while it matters (attached: through the delta module's owner)."""
_HANDLES: "weakref.WeakKeyDictionary[nn.Module, list[RemovableHandle]]" = weakref.WeakKeyDictionary()


def attachments_on(site: nn.Module) -> list[Attachment]:
    """The attachments whose delta is a child of ``site`` (attached or not), in insertion order."""
    return [a for a in _touching(site) if a.site is site]


def _touching(module: nn.Module) -> list[Attachment]:
    """The live attachments that touch ``module``, in insertion order."""
    return [att for ref in _ATTACHMENTS.get(module, []) if (att := ref()) is not None]


def attach(att: Attachment) -> None:
    """Register ``att.delta`` as a child of its site and (re)wire the modules it touches."""
    if att.attached:
        return
    if not att.child_name:
        att.child_name = _free_child_name(att.site, att.base_name)
    elif _name_taken(att.site, att.child_name):
        raise SiteError(
            f"Cannot re-attach {att.base_name!r} at {att.site_name!r}: the site now has another "
            f"attribute named {att.child_name!r}. Remove it, or detach the delta that owns it."
        )
    touched = att.mechanism.modules(att)
    att.site.add_module(att.child_name, att.delta)
    att.attached = True
    for module in touched:
        slots = _ATTACHMENTS.setdefault(module, [])
        if not any(ref() is att for ref in slots):
            slots.append(weakref.ref(att))
        _rewire(module)


def detach(att: Attachment) -> None:
    """Remove ``att.delta`` from its site; the modules it touched are as before it."""
    if not att.attached:
        return
    del att.site._modules[att.child_name]
    att.attached = False
    for module in att.mechanism.modules(att):
        _rewire(module)


def suspend(att: Attachment, suspended: bool = True) -> None:
    """Turn ``att``'s hooks off (or back on) without touching the module tree or parameters."""
    if att.suspended == suspended:
        return
    att.suspended = suspended
    if att.attached:
        for module in att.mechanism.modules(att):
            _rewire(module)


def forget(att: Attachment) -> None:
    """Detach and drop the record (used to roll back a failed attach, and to unload)."""
    detach(att)
    for module in att.mechanism.modules(att):
        slots = [ref for ref in _ATTACHMENTS.get(module, []) if ref() not in (None, att)]
        if slots:
            _ATTACHMENTS[module] = slots
        else:
            _ATTACHMENTS.pop(module, None)


def _free_child_name(site: nn.Module, base: str) -> str:
    reserved = {a.child_name for a in attachments_on(site)}
    for i in itertools.count():
        name = base if i == 0 else f"{base}_{i}"
        if name not in reserved and not _name_taken(site, name):
            return name
    raise AssertionError("itertools.count() never ends")  # for type checkers: no implicit None


def _name_taken(module: nn.Module, name: str) -> bool:
    """Whether ``name`` is an attribute of ``module`` (looked up without raising AttributeError,
    which is slow enough to matter on 500+ sites)."""
    return (name in module._modules or name in module._parameters or name in module._buffers
            or name in module.__dict__ or hasattr(type(module), name))


def _rewire(module: nn.Module) -> None:
    """Remove every deltadist hook of ``module`` and register the live ones in insertion order."""
    for handle in _HANDLES.pop(module, []):
        handle.remove()
    live = sorted((a for a in _touching(module) if a.attached and not a.suspended),
                  key=lambda a: a.order)
    handles = [handle for att in live for handle in att.mechanism.wire(att, module)]
    if handles:
        _HANDLES[module] = handles
    refresh_compiled_graphs()


def delta_modules(root: nn.Module) -> dict[str, DeltaModule]:
    """Every attached delta module under ``root`` by its (raw) module name, of any delta object.

    For what *one* delta owns, ask its record (:class:`deltadist.core.record.DeltaRecord`); this is for
    keeping every delta out of the backbone (fingerprint, site selection, weight loading).
    """
    return {n: m for n, m in walk_modules(root) if isinstance(m, DeltaModule)}


def delta_parameter_ids(root: nn.Module) -> set[int]:
    """``id()`` of every parameter of every delta module under ``root``."""
    return {id(p) for m in delta_modules(root).values() for p in m.parameters()}
