"""Freezing around a delta: ``freeze_module`` and its undo (a mixin of ``DeltaBase``).

One notion of trainable: the record's delta parameters (with ``"deltas"``) and its kept backbone
parameters. ``freeze_module(exclude=[...])`` *changes* that notion (the record and the config's
``unfrozen_modules``), so what trains is what ``parameters()`` lists and what ``save_finetuned``
writes. Other deltas' parameters, and the backbone parameters another delta keeps (its task
head), keep their flags: they belong to other delta objects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from deltadist.addressing.select import DELTAS_KEYWORD
from deltadist.api import construction, ownership
from deltadist.core import attach as mechanisms
from deltadist.core import freeze
from deltadist.core.record import records_on

if TYPE_CHECKING:
    from deltadist.core.record import DeltaRecord


class FreezeMixin:
    """``freeze_module`` and the bookkeeping that lets ``detach``/``attach`` undo and redo it."""

    record: "DeltaRecord"
    backbone_model: nn.Module
    _frozen_scope: nn.Module | None = None

    def freeze_module(self, module: nn.Module | None = None, exclude: list[str] | None = None,
                      set_state_dict: bool = True) -> None:
        """Freeze every parameter of ``module`` (default: the backbone) except what the delta trains.

        Args:
            module: the module to freeze; defaults to the backbone.
            exclude: patterns kept trainable, replacing the config's ``unfrozen_modules`` (and
                updating it, so they are also listed by ``parameters()`` and saved):
                ``"deltas"`` for this delta's parameters; other patterns select backbone modules
                (with their subtrees) or parameters by name (``"bias"``).
            set_state_dict: make ``module.state_dict()`` hold only trainable parameters (done with
                state-dict hooks; :func:`deltadist.full_state_dict` gives the whole one back).

        Raises:
            AddressingError: an ``exclude`` pattern matches no backbone parameter. Nothing is
                changed then.
        """
        self._check_usable("freeze_module()")
        module = self.backbone_model if module is None else module
        self.engine.settle(module)
        if exclude is not None:
            self._keep_trainable(list(exclude))
        self._frozen_scope = module
        self.record.frozen = True
        self.record.filtered_state_dict = set_state_dict
        self._apply_flags()
        if set_state_dict:
            freeze.filter_state_dict(module, self.record)
        else:
            freeze.release_state_dict(module, self.record)

    def _keep_trainable(self, patterns: list[str]) -> None:
        """Make ``patterns`` the delta's notion of trainable (record, copies and config)."""
        _, kept, copied = ownership.resolve_unfrozen(self.backbone_model, patterns, loading=False,
                                                     sites=self.record.site_names, this=self.record)
        construction.sync_copies(self, copied)
        self.record.kept_backbone = kept
        self.record.train_deltas = DELTAS_KEYWORD in patterns
        self.config = self.config.replace(unfrozen_modules=patterns)

    def _apply_flags(self) -> None:
        record = self.record
        scope = self._frozen_scope if self._frozen_scope is not None else self.backbone_model
        own = record.delta_parameter_ids()
        kept = {id(p) for p in record.backbone_parameters().values()}
        # Other deltas' parameters, and the backbone parameters they keep, are theirs to freeze.
        foreign = mechanisms.delta_parameter_ids(self.backbone_model) - own
        foreign |= {id(p) for other in records_on(self.backbone_model) if other is not record
                    for p in other.backbone_parameters().values()}
        fixed = record.fixed_parameter_ids()
        changed = freeze.set_trainable(
            (p for p in scope.parameters() if id(p) not in foreign),
            lambda p: (id(p) in own and record.train_deltas and id(p) not in fixed) or id(p) in kept,
        )
        for key, value in changed.items():  # keep the oldest previous flag of each parameter
            record.changed_flags.setdefault(key, value)

    def _release_freeze(self, reset_state_dict: bool) -> None:
        """Undo the flags (and, with ``reset_state_dict``, the state-dict filter) of freezing.

        A backbone parameter another attached, frozen delta also keeps frozen stays frozen: its
        previous flag passes to that delta, whose own detach puts it back.
        """
        heir = next((other for other in records_on(self.backbone_model) if other is not self.record
                     and other.frozen and all(att.attached for att in other.attachments)), None)
        own = self.record.delta_parameter_ids()
        restore: freeze.ChangedFlags = {}
        for key, (param, previous) in self.record.changed_flags.items():
            if heir is not None and key not in own and not param.requires_grad:
                heir.changed_flags.setdefault(key, (param, previous))
            else:
                restore[key] = (param, previous)
        freeze.restore_flags(restore)
        self.record.changed_flags = {}
        if reset_state_dict and self._frozen_scope is not None:
            freeze.release_state_dict(self._frozen_scope, self.record)

    def _reapply_freeze(self, reset_state_dict: bool) -> None:
        """Freeze again as the last ``freeze_module`` did (after a re-attach)."""
        if not self.record.frozen:
            return
        self._apply_flags()
        if reset_state_dict and self.record.filtered_state_dict and self._frozen_scope is not None:
            freeze.filter_state_dict(self._frozen_scope, self.record)
