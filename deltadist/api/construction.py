"""A delta's construction steps between selecting and attaching: the sites its config selects
(after the method's ``_targets``), and one delta module per site (the method's ``_build_shared``,
``_build_delta`` and ``_mechanism_for``), all or none."""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltadist.addressing.select import Site
from deltadist.core import attach as mechanisms
from deltadist.core.attach import Attachment
from deltadist.core.mechanism import HOLDER
from deltadist.errors import SiteError
from deltadist.mechanisms.copies import COPY_NAME, SERVE_COPY, TrainedCopy

if TYPE_CHECKING:
    from deltadist.api.delta_base import DeltaBase


def select_targets(delta: "DeltaBase") -> list[Site]:
    """The sites the config selects, after broadcasting; errors name what cannot be modified."""
    attached = frozenset(id(m) for m in mechanisms.delta_modules(delta.backbone_model).values())
    sites = delta._select_sites(attached)
    targets: dict[tuple[str | None, str], Site] = {}
    problems: list[str] = []
    for site in sites:
        try:
            targets.update(((t.start_name, t.name), t) for t in delta._targets(site))
        except SiteError as err:
            problems.append(f"  {err}")
    if not targets and not problems:
        problems = [f"  {s.name!r} ({type(s.module).__name__})" for s in sites[:10]]
    if problems:
        raise _cannot_modify(delta, problems)
    return list(targets.values())


def build_attachments(delta: "DeltaBase", targets: list[Site]) -> list[Attachment]:
    """The shared-parameter holder (if any) first, then one delta module per target."""
    shared = delta._shared = delta._build_shared(targets)
    if shared is not None:
        shared.train(delta.backbone_model.training)
    attachments = [] if shared is None else [Attachment(
        site=delta.backbone_model, site_name="", delta=shared, base_name=delta.shared_name,
        mechanism=HOLDER)]
    problems = []
    for target in targets:
        try:
            module = delta._build_delta(target)
        except SiteError as err:
            problems.append(f"  {err}")
            continue
        module.train(target.module.training)  # a delta on an eval-mode model starts in eval mode (dropout)
        attachments.append(Attachment(site=target.module, site_name=target.name, delta=module,
                                      base_name=delta.child_name, start=target.start,
                                      mechanism=delta._mechanism_for(target)))
    if problems:
        raise _cannot_modify(delta, problems)
    return attachments


def copy_attachments(delta: "DeltaBase", units: list[str]) -> list[Attachment]:
    """One trained copy per module in ``units`` (canonical names), in the module's mode."""
    attachments = []
    for name in units:
        module = delta.backbone_model.get_submodule(name)
        attachments.append(Attachment(site=module, site_name=name, delta=TrainedCopy(module, delta.engine),
                                      base_name=COPY_NAME, mechanism=SERVE_COPY))
    return attachments


def sync_copies(delta: "DeltaBase", units: list[str]) -> None:
    """Make the delta's trained copies those of ``units``: new ones attached (where the engine
    lets new parameters join), those no longer kept dropped."""
    record = delta.record
    have = {att.site_name: att for att in record.trained_copies()}
    new = copy_attachments(delta, [name for name in units if name not in have])
    gone = [att for name, att in have.items() if name not in units]
    if new:
        delta.engine.check_attachable(delta.backbone_model)
    for att in gone:
        mechanisms.forget(att)
        record.attachments.remove(att)
    for att in new:
        mechanisms.attach(att)
        att.delta.owner.delta = delta
        record.attachments.append(att)
    delta.engine.adopt(att.delta for att in new)


def _cannot_modify(delta: "DeltaBase", problems: list[str]) -> SiteError:
    return SiteError(
        f"{type(delta).__name__} cannot modify these modules:\n" + "\n".join(problems)
        + "\nChange modified_modules (or exclude_modules) to skip them. Nothing was changed."
    )
