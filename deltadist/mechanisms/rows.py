"""Which rows of a call each attachment serves: the state a :func:`deltadist.mixed_batch` block
sets, read by the mechanisms at every call (kept apart so the mechanisms need nothing else)."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from deltadist.errors import DeltaError

if TYPE_CHECKING:
    from deltadist.core.attach import Attachment


@dataclass(frozen=True)
class Routes:
    """The routing of one mixed block."""

    rows: int
    """How many rows the block listed."""
    by_attachment: dict[int, torch.Tensor]
    """``id(attachment)`` -> the listed rows it serves (int64, ascending; may be empty)."""
    groups: dict[int, tuple["Attachment", ...]] = field(default_factory=dict)
    """``id(first attachment)`` -> every attachment of one site computed together by the delta
    class's ``grouped_update`` (one batched product for all rows instead of one per delta)."""
    followers: frozenset[int] = frozenset()
    """``id()`` of the other members of a group: their share is in the first member's update."""


ROUTES: ContextVar[Routes | None] = ContextVar("deltadist_mixed_batch", default=None)


def rows_for(att: "Attachment", batch: int, device: torch.device) -> torch.Tensor | None:
    """The rows of a ``batch``-row call that ``att`` serves, or ``None`` outside a mixed block (or
    for an attachment of a model the block does not route): then it serves every row.

    Raises:
        DeltaError: ``batch`` is not a whole multiple of the rows the block listed.
    """
    routes = ROUTES.get()
    if routes is None:
        return None
    mine = routes.by_attachment.get(id(att))
    if mine is None:
        return None
    if batch % routes.rows:
        raise DeltaError(f"mixed_batch listed {routes.rows} rows, but {att.base_name!r} at "
                         f"{att.site_name!r} was called on a batch of {batch}; pass one entry per "
                         "row of the batch.")
    repeat = batch // routes.rows
    if repeat > 1:
        mine = (mine[:, None] * repeat + torch.arange(repeat)).reshape(-1)
    return mine.to(device)


def group_of(att: "Attachment") -> tuple["Attachment", ...] | None:
    """Inside a mixed block: every attachment computed together with ``att`` if it leads a group,
    ``()`` if another member's call computes its share, ``None`` if it runs on its own."""
    routes = ROUTES.get()
    if routes is None:
        return None
    if id(att) in routes.followers:
        return ()
    return routes.groups.get(id(att))
