"""The one record of what a delta owns.

A delta owns two kinds of parameters:

* **delta parameters**: the parameters of the delta modules it created, one module per site, plus
  modules that only hold parameters shared by several sites (an attachment whose mechanism is
  ``HOLDER``, registered once, e.g. on the model root). They are keyed ``<site>.<kind>.<param>``;
  a module whose site is the model root is keyed ``<kind>.<param>``. :func:`delta_key` builds
  every key.
* **kept backbone parameters**: backbone parameters the delta keeps trainable and saves with
  itself (a task head, ``unfrozen_modules=["deltas", "classifier"]``), by canonical name. Where the
  delta trains its own copy of the module (an attachment whose mechanism ``copies_backbone``), the
  name stands for the copy's parameter; otherwise for the backbone's, trained in place.

Freezing, ``parameters()``, ``state_dict()``, saving, loading, detaching, merging, ``log()``, the
fingerprint and the engines all read this record; nothing else decides what "the delta" is.
Parameters are looked up through the modules and names at every call, never cached: an engine
(FSDP2) may replace a module's parameter objects when it shards them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from torch import nn

from deltadist.addressing.names import canonical_parameters
from deltadist.core.attach import Attachment
from deltadist.core.mechanism import HOLDER

_RECORDS: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[DeltaRecord]]" = weakref.WeakKeyDictionary()


def records_on(backbone: nn.Module) -> list["DeltaRecord"]:
    """The records of every delta built on ``backbone`` and not unloaded (attached or detached)."""
    return list(_RECORDS.get(backbone, ()))


def kept_by_other_deltas(backbone: nn.Module, this: "DeltaRecord | None" = None) -> set[str]:
    """Canonical names of the backbone parameters other deltas on ``backbone`` train in place (not
    on copies of their own)."""
    return {name for other in records_on(backbone) if other is not this for name in other.kept_in_place()}


def delta_key(site_name: str, kind: str, param_name: str) -> str:
    """Checkpoint key of a delta parameter: ``<site>.<kind>.<param>`` (no site part at the root)."""
    return ".".join(part for part in (site_name, kind, param_name) if part)


@dataclass(eq=False)
class DeltaRecord:
    """What one delta owns, and the state its ``freeze_module`` put the backbone in.

    Attributes:
        backbone: the model the delta is attached to.
        attachments: one per delta module (site deltas and shared-parameter holders).
        kept_backbone: canonical names of backbone parameters trained and saved with the delta.
        train_deltas: whether ``freeze_module`` keeps the delta parameters trainable (``"deltas"``).
        frozen: whether ``freeze_module`` has been applied (re-applied by ``attach``).
        filtered_state_dict: whether ``freeze_module(set_state_dict=True)`` was asked for.
        merged: whether ``merge()`` has folded the delta into the backbone's weights.
        changed_flags: ``requires_grad`` values that freezing replaced, by parameter ``id``
            (the parameter and its previous flag), so ``detach`` can put them back.
    """

    backbone: nn.Module
    attachments: list[Attachment]
    kept_backbone: tuple[str, ...] = ()
    train_deltas: bool = True
    frozen: bool = False
    filtered_state_dict: bool = False
    merged: bool = False
    changed_flags: dict[int, tuple[nn.Parameter, bool]] = field(default_factory=dict)

    def register(self) -> None:
        """Make this record known on its backbone (:func:`records_on`)."""
        _RECORDS.setdefault(self.backbone, weakref.WeakSet()).add(self)

    def unregister(self) -> None:
        """Forget this record (the delta was removed for good)."""
        _RECORDS.get(self.backbone, weakref.WeakSet()).discard(self)

    def delta_parameters(self) -> dict[str, nn.Parameter]:
        """Every delta parameter by checkpoint key, in attach order (trained copies left out)."""
        return {
            delta_key(att.site_name, att.base_name, name): param
            for att in self.attachments if not att.mechanism.copies_backbone
            for name, param in att.delta.named_parameters()
        }

    def trained_copies(self) -> list[Attachment]:
        """The attachments of the delta's trained copies of backbone modules (task heads)."""
        return [att for att in self.attachments if att.mechanism.copies_backbone]

    def copied_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters of the delta's trained copies, by the backbone names they stand for."""
        return {
            delta_key(att.site_name, "", name): param
            for att in self.trained_copies()
            for name, param in att.delta.module.named_parameters()
        }

    def backbone_parameters(self) -> dict[str, nn.Parameter]:
        """The kept backbone parameters by canonical name: the delta's copies where it has them."""
        if not self.kept_backbone:
            return {}
        copies = self.copied_parameters()
        # The backbone's own parameters are looked up only if some are trained in place.
        params = canonical_parameters(self.backbone) if set(self.kept_backbone) - copies.keys() else {}
        found = {**params, **copies}
        return {name: found[name] for name in self.kept_backbone if name in found}

    def kept_in_place(self) -> tuple[str, ...]:
        """The kept backbone parameters the delta trains in place (no copy of their module)."""
        copied = self.copied_parameters()
        return tuple(name for name in self.kept_backbone if name not in copied)

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """Everything the delta trains and saves, by checkpoint key."""
        return {**self.delta_parameters(), **self.backbone_parameters()}

    def delta_parameter_ids(self) -> set[int]:
        """``id()`` of every parameter of this delta's modules."""
        return {id(p) for att in self.attachments for p in att.delta.parameters()}

    def fixed_parameter_ids(self) -> set[int]:
        """Delta parameters that are saved but never trained (e.g. a Compacter rule not learned)."""
        return {id(p) for att in self.attachments for p in att.delta.fixed_parameters()}

    @property
    def site_names(self) -> list[str]:
        """Canonical names of the modified sites (shared-parameter holders and trained copies left
        out), in order."""
        return list(dict.fromkeys(a.site_name for a in self.attachments
                                  if a.mechanism is not HOLDER and not a.mechanism.copies_backbone))
