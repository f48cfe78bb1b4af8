"""One batch, a different delta per row: ``with deltadist.mixed_batch([french, english, None, french])``.

Inside the block every attachment of the deltas on that backbone applies to its own rows only: a
listed delta to the rows that name it, a delta attached but not listed (and ``None`` rows) to
none. The mechanisms ask :func:`rows_for` at each call and run the delta on those rows alone
(``index_select``, the delta, then ``index_add`` / ``index_copy`` back), so each row gets what it
gets with only its delta attached, and one backward gives each delta the gradients of its own
rows. The routing (:mod:`deltadist.mechanisms.rows`) is set on each delta module's call state for
the block and put back as it was after it (blocks nest). It is state of the model, like a delta
being attached: a block routes every call of that model, from any thread, and a copy of the model
(``copy.deepcopy``) is not routed.

A call on more rows than were listed, by a whole multiple ``m`` (``generate`` with beam search or
``num_return_sequences`` repeats each row ``m`` times in place, ``repeat_interleave``), routes
row ``i`` like listed row ``i // m``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import nn

from deltadist.addressing.common import common_name_index
from deltadist.core.attach import attachments_on
from deltadist.core.record import records_on
from deltadist.errors import DeltaError
from deltadist.mechanisms.hooks import PARALLEL

if TYPE_CHECKING:
    from deltadist.core.attach import Attachment

ROUTABLE_MECHANISMS = ("parallel", "after", "before", "span", "holder", "key_value_prefix", "trained_copy")
"""Mechanisms whose delta can serve some rows only (soft prompts rewrite the sequence: not yet)."""


@contextlib.contextmanager
def mixed_batch(rows: Sequence[Any]) -> Iterator[None]:
    """Route row ``i`` of every call inside the block through ``rows[i]`` (a delta) or through the
    bare backbone (``None``).

    Raises:
        DeltaError: nothing listed but ``None``; deltas of different models; a delta not attached,
            merged, or of a method that cannot be routed by rows; a delta on the same model merged.
    """
    listed = [d for d in rows if d is not None]
    if not listed:
        raise DeltaError("mixed_batch needs at least one delta in its row list (None rows use the "
                         "bare backbone); for a batch without deltas use `with delta.disabled():`.")
    backbone = listed[0].backbone_model
    for i, delta in enumerate(rows):
        if delta is not None:
            _check_listed(delta, i, backbone)
    _refuse_recomputation_after_the_block(backbone)
    if any(record.merged for record in records_on(backbone)):
        raise DeltaError("mixed_batch: a delta on this model is merged into its weights, so it "
                         "would apply to every row; call unmerge() on it before the block.")
    # Each listed delta's rows, once per delta (not per attachment: a block is entered per batch).
    served_by: dict[int, list[int]] = {}
    for i, delta in enumerate(rows):
        if delta is not None:
            served_by.setdefault(id(delta), []).append(i)
    indices = {key: torch.tensor(served, dtype=torch.long) for key, served in served_by.items()}
    owned = {id(att): (served_by[id(delta)], indices[id(delta)])
             for delta in {id(d): d for d in listed}.values() for att in delta.record.attachments}
    unserved: tuple[list[int], torch.Tensor] = ([], torch.empty(0, dtype=torch.long))
    # Every attachment on the model, not only those of deltas someone still holds: a delta object
    # that was dropped keeps its hooks, and it must serve no row either.
    routes: dict[int, tuple[nn.Module, torch.Tensor, tuple[str, ...] | None]] = {}
    routed: set[str] | None = None  # sites that see the tokens a router sent them, not rows
    for module in backbone.modules():
        on_site = attachments_on(module)
        for att in on_site:
            served, index = owned.get(id(att), unserved)
            _check_routable(att, served, len(rows))
            if served and len(served) != len(rows):
                routed = _token_routed(backbone) if routed is None else routed
                _check_rows_reach(att, served, len(rows), routed)
            routes[id(att)] = (att.delta, index, None)
        group = _groupable([a for a in on_site if id(a) in owned])
        if len(group) > 1:
            names = tuple(a.child_name for a in group)
            for member in group:
                delta, served, _ = routes[id(member)]
                routes[id(member)] = (delta, served, names if member is group[0] else ())
    saved = [(delta, delta.call_state.rows, delta.call_state.listed, delta.call_state.group)
             for delta, _, _ in routes.values()]
    for delta, served, group in routes.values():
        delta.call_state.rows, delta.call_state.listed, delta.call_state.group = served, len(rows), group
    try:
        yield
    finally:
        for delta, served, count, group in saved:
            delta.call_state.rows, delta.call_state.listed, delta.call_state.group = served, count, group


def _refuse_recomputation_after_the_block(backbone: nn.Module) -> None:
    """Activation checkpointing recomputes a layer's forward during the backward, which usually runs
    after the block, when no routing is set: every delta would then apply to every row of the
    recomputed layer (silently wrong gradients, or torch's CheckpointError). transformers
    checkpoints a layer whose ``gradient_checkpointing`` is set while it trains."""
    if not torch.is_grad_enabled():
        return  # nothing is recomputed without a backward (evaluation, generate)
    checkpointed = [name for name, module in backbone.named_modules()
                    if getattr(module, "gradient_checkpointing", False) is True and module.training]
    if checkpointed:
        raise DeltaError(
            f"mixed_batch cannot train with activation checkpointing ({checkpointed[0] or 'the model'} "
            "recomputes its forward in the backward, after the block, without the rows' routing). "
            "Turn it off for mixed-batch training (model.gradient_checkpointing_disable()), or run "
            "the block under torch.no_grad() / in eval mode for inference. Nothing was routed."
        )


def _check_listed(delta: Any, row: int, backbone: Any) -> None:
    record = getattr(delta, "record", None)
    if record is None:
        raise DeltaError(f"mixed_batch: row {row} is a {type(delta).__name__}; each row is a delta "
                         "(what LoraModel(...) or AutoDeltaModel returns) or None.")
    if delta.backbone_model is not backbone:
        raise DeltaError(f"mixed_batch: row {row}'s delta is attached to another model than the "
                         "first listed delta's; one block routes the rows of one model.")
    if getattr(delta, "unloaded", False) or not delta.is_attached:
        raise DeltaError(f"mixed_batch: row {row}'s delta is not attached; call delta.attach() "
                         "before the block.")


def _token_routed(backbone: nn.Module) -> set[str]:
    """Canonical names of the modules inside experts (``ff.experts.$.w1``...: transformers 4.5x
    expert modules), which a router calls on the tokens it sent them, flattened: their rows are
    tokens of any batch row, so a delta there cannot be routed by batch rows."""
    return {name for name, commons in common_name_index(backbone).items()
            if any(".ff.experts." in c for c in commons)}


def _check_rows_reach(att: "Attachment", owner: list[int], count: int, routed: set[str]) -> None:
    if att.site_name in routed and att.attached and not att.suspended:
        raise DeltaError(
            f"mixed_batch cannot route {att.base_name!r} at {att.site_name!r} by rows: an expert is "
            f"called on the tokens its router picked, not on batch rows, so it serves every row of a "
            f"batch or none, not rows {owner} of {count}. Run those rows in a batch of their own.")


def _check_routable(att: "Attachment", owner: list[int], count: int) -> None:
    if att.mechanism.name == "parameter_offset" and att.attached and not att.suspended:
        if owner and len(owner) != count:  # one weight for the whole call: every row or none
            raise DeltaError(
                f"mixed_batch cannot route {att.base_name!r} at {att.site_name!r} by rows: it changes "
                f"the parameter itself for the whole call (fused experts), so it serves every row of "
                f"a batch or none, not rows {owner} of {count}. Run those rows in a batch of their own.")
        return
    if att.mechanism.name not in ROUTABLE_MECHANISMS and att.attached and not att.suspended:
        raise DeltaError(
            f"mixed_batch cannot route {att.base_name!r} by rows yet (it rewrites the sequence, "
            f"not each row's hidden states); detach it, or run it in a batch of its own"
            + (f" (rows {owner})." if owner else ".")
        )


def _groupable(serving: list["Attachment"]) -> list["Attachment"]:
    """The live ``PARALLEL`` attachments of one site (serving some rows) that one call of their
    delta class's ``grouped_update`` can compute together: same class and dtype, each groupable."""
    live = [a for a in serving if a.attached and not a.suspended and a.mechanism is PARALLEL
            and getattr(a.delta, "groupable", False)]
    if len(live) < 2:
        return live
    dtypes = [_dtype_of(a.delta) for a in live]
    kind = type(live[0].delta)
    return [a for a, dtype in zip(live, dtypes) if type(a.delta) is kind and dtype == dtypes[0]]


def _dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype of a delta module's first parameter (its own, before its children's)."""
    own = next(iter(module._parameters.values()), None)
    return own.dtype if own is not None else next(module.parameters()).dtype
