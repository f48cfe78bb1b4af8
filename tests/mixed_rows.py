"""What a mixed batch must equal: each row run with only its own delta attached."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

import deltadist
from tests.tiny import logits_of


def alone(deltas: Sequence[Any], chosen: Any) -> None:
    """Attach only ``chosen`` of ``deltas`` (``None``: none)."""
    for delta in deltas:
        (delta.attach if delta is chosen else delta.detach)()


def assert_rows_as_alone(model: nn.Module, deltas: Sequence[Any], rows: Sequence[Any],
                         inputs: dict[str, torch.Tensor], **tol: float) -> torch.Tensor:
    """One forward and backward of ``model`` over ``inputs`` inside ``mixed_batch(rows)`` gives each
    row the logits, and each delta the gradient, of its rows run with only that delta attached.
    Returns the mixed logits; every delta is attached again afterwards."""
    with deltadist.mixed_batch(rows):
        mixed = logits_of(model, inputs)
        mixed.pow(2).sum().backward()
    grads = {id(p): p.grad.clone() for d in deltas for p in d.parameters()}
    for delta in deltas:
        delta.attach()
        for param in delta.parameters():
            param.grad = None
    for chosen in (*deltas, None):
        alone(deltas, chosen)
        picked = [i for i, r in enumerate(rows) if r is chosen]
        lone = logits_of(model, {k: v[picked] for k, v in inputs.items()})
        torch.testing.assert_close(mixed[picked], lone, **tol)
        if chosen is not None:  # its gradient comes from its own rows only
            lone.pow(2).sum().backward()
            for param in chosen.parameters():
                torch.testing.assert_close(grads[id(param)], param.grad, **tol)
    alone(deltas, None)
    for delta in deltas:
        delta.attach()
    return mixed
