"""Delta names: every delta on a model has one, unique on that model.

A name is the config's ``delta_name`` (saved and restored with the checkpoint), or, for a delta
built without one, ``<delta_type>_<n>`` with the smallest ``n`` free on the model when the delta
is built. A default name is the delta's for its whole life (other deltas coming and going never
rename it) but is not written to the config, so an unnamed checkpoint stays unnamed and gets a
default on the model it is loaded onto.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Protocol

from torch import nn

from deltadist.core.record import DeltaRecord, records_on
from deltadist.errors import ConfigError


class DeltaBase(Protocol):
    """What naming needs of a delta object (:class:`deltadist.DeltaBase` is one)."""

    @property
    def name(self) -> str: ...


# record -> (its delta object, creation order). Kept here, keyed weakly, so the record stays plain
# data: a delta object that is garbage collected takes its record (and its name) with it.
_OWNERS: "weakref.WeakKeyDictionary[DeltaRecord, tuple[weakref.ref[DeltaBase], int]]" = (
    weakref.WeakKeyDictionary()
)
_ORDER = itertools.count()


def deltas_on(model: nn.Module) -> dict[str, "DeltaBase"]:
    """The deltas built on ``model`` and not unloaded (attached, detached or merged), by name,
    oldest first.

    ``model`` is the model the deltas were built on, or a wrapper around it that keeps it as
    ``.module`` (DDP, a DeepSpeed engine) or ``._orig_mod`` (``torch.compile``).

    Example:
        >>> french = LoraModel(model, delta_name="french")  # doctest: +SKIP
        >>> deltadist.deltas_on(model)  # doctest: +SKIP
        {'french': LoraModel('french', 12 sites, 73,728 parameters, attached)}
    """
    for candidate in (model, getattr(model, "_orig_mod", None), getattr(model, "module", None)):
        if isinstance(candidate, nn.Module) and records_on(candidate):
            model = candidate
            break
    found = []
    for record in records_on(model):
        owner, order = _OWNERS.get(record, (None, 0))
        delta = owner() if owner is not None else None
        if delta is not None:
            found.append((order, delta))
    return {delta.name: delta for _, delta in sorted(found, key=lambda item: item[0])}


def claim_name(backbone: nn.Module, delta_type: str, requested: str | None) -> str:
    """The name a new delta on ``backbone`` gets: ``requested``, or a free default.

    Raises:
        ConfigError: ``requested`` is the name of a delta already on ``backbone``.
    """
    taken = deltas_on(backbone)
    if requested is None:
        return next(f"{delta_type}_{n}" for n in itertools.count() if f"{delta_type}_{n}" not in taken)
    if requested in taken:
        raise ConfigError(
            f"This model already has a delta named {requested!r} ({taken[requested]!r}); names are "
            "unique per model. Pass another delta_name= (from_finetuned takes it too), or remove "
            "that delta first (merge_and_unload(), or build on another copy of the model). Nothing "
            "was changed."
        )
    return requested


def remember(record: DeltaRecord, delta: "DeltaBase") -> None:
    """Make ``delta`` findable from its (registered) record by :func:`deltas_on`."""
    _OWNERS[record] = (weakref.ref(delta), next(_ORDER))
