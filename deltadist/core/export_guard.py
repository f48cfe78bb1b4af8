"""``save_pretrained`` never writes half a model: while a delta module is attached, an export of
the model around it is refused with the ways out.

Each delta module carries the guard, a state-dict post-hook of its own, so the guard holds exactly
while a delta is attached (frozen or not, loaded or built), travels with a copy of the model, and
goes with the module when it is detached. :func:`full_state_dict` lifts it (and the trainable-only
filter of ``freeze_module``) for a block: then the backbone and the delta weights are written as
they are.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from typing import Iterator

from torch import nn

from deltadist.errors import ExportError

_SUSPENDED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
"""Modules inside a :func:`full_state_dict` block."""


@contextlib.contextmanager
def full_state_dict(module: nn.Module) -> Iterator[nn.Module]:
    """Within this block ``module.state_dict()`` is complete again, even after
    ``freeze_module(set_state_dict=True)``, and ``save_pretrained`` writes the model as it is.

    Example:
        >>> with deltadist.full_state_dict(model):
        ...     torch.save(model.state_dict(), "full.pt")  # doctest: +SKIP
    """
    _SUSPENDED.add(module)
    try:
        yield module
    finally:
        _SUSPENDED.discard(module)


def is_suspended(module: nn.Module) -> bool:
    """Whether ``module`` is, or is inside, a module of a :func:`full_state_dict` block."""
    return any(module is m or any(module is sub for sub in m.modules()) for m in list(_SUSPENDED))


def inside_save_pretrained(module: nn.Module) -> bool:
    """Whether a ``save_pretrained`` of ``module`` or of a model containing it is running.

    Why the call stack: transformers' and huggingface_hub's ``save_pretrained`` get the weights
    from ``state_dict()`` like every other caller; nothing else tells an export apart from an
    engine's or a trainer's checkpoint, which must keep getting the dict it always gets.
    """
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "save_pretrained":
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and any(m is module for m in owner.modules()):
                return True
        frame = frame.f_back
    return False


def refuse_export(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """A delta module's state-dict post-hook: raise inside ``save_pretrained`` (outside a
    :func:`full_state_dict` block); every other caller gets the state dict unchanged."""
    if not inside_save_pretrained(module) or is_suspended(module):
        return
    raise ExportError(
        f"save_pretrained() would write the delta module {prefix.rstrip('.')!r} (and any other attached "
        "one) as extra weights that from_pretrained() drops, so the export would silently lose the "
        "delta. To export a model with the delta folded in: "
        "delta.merge_and_unload().save_pretrained(path). To keep the delta separate: "
        "delta.save_finetuned(path) (and save the backbone before attaching). To write the "
        "backbone and the delta weights as they are: with deltadist.full_state_dict(model): "
        "model.save_pretrained(path)."
    )
