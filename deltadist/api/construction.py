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


def _cannot_modify(delta: "DeltaBase", problems: list[str]) -> SiteError:
    return SiteError(
        f"{type(delta).__name__} cannot modify these modules:\n" + "\n".join(problems)
        + "\nChange modified_modules (or exclude_modules) to skip them. Nothing was changed."
    )
