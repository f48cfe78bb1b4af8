"""Which rows of a call a delta serves: read by every mechanism at the top of the call from the
delta module's own :class:`~deltadist.core.delta_module.CallState`, which a
:func:`deltadist.mixed_batch` block sets and clears."""

from __future__ import annotations

import torch
from torch import nn

from deltadist.errors import DeltaError


def rows_for(delta: nn.Module, batch: int, device: torch.device) -> torch.Tensor | None:
    """The rows of a ``batch``-row call that ``delta`` serves, or ``None`` outside a mixed block
    (or for a delta of a model the block does not route): then it serves every row.

    A call on a whole multiple ``m`` of the listed rows (``generate`` with beams repeats each row
    ``m`` times in place) routes row ``i`` like listed row ``i // m``.

    Raises:
        DeltaError: ``batch`` is not a whole multiple of the rows the block listed.
    """
    state = delta.call_state
    mine = state.rows
    if mine is None:
        return None
    if batch % state.listed:
        raise DeltaError(f"mixed_batch listed {state.listed} rows, but a {type(delta).__name__} delta "
                         f"was called on a batch of {batch}; pass one entry per row of the batch.")
    repeat = batch // state.listed
    if repeat > 1:
        mine = (mine[:, None] * repeat + torch.arange(repeat)).reshape(-1)
    return mine.to(device)


def group_of(delta: nn.Module) -> tuple[str, ...] | None:
    """Inside a mixed block: the child names of every delta of this site computed together with
    ``delta`` if it leads a group, ``()`` if another member's call computes its share, ``None`` if
    it runs on its own."""
    return delta.call_state.group
