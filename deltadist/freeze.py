"""Freezing: ``requires_grad`` on leaf parameters, and the trainable-only state dict.

Freezing only flips ``requires_grad`` on leaf parameters, so it is safe before or after an engine
wraps the model. The trainable-only state dict (OpenDelta's ``set_state_dict=True``) is a pair of
state-dict hooks, never a reassigned ``state_dict`` method:

* a state-dict post-hook drops every frozen parameter and every buffer from ``state_dict()``;
* a load post-hook stops ``load_state_dict(strict=True)`` from reporting exactly those keys as
  missing, so an engine that saves with ``state_dict()`` and loads strictly still resumes.

:func:`full_state_dict` gives the whole state dict back (engines and users who save the backbone).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle

from deltadist.addressing.names import canonical_name, canonical_parameters

_FILTERED: "weakref.WeakKeyDictionary[nn.Module, list[RemovableHandle]]" = weakref.WeakKeyDictionary()
_SUSPENDED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def set_trainable(module: nn.Module, keep: Callable[[str, nn.Parameter], bool]) -> None:
    """Set ``requires_grad`` on every leaf parameter to ``keep(canonical_name, param)``."""
    for name, param in canonical_parameters(module).items():
        if param.is_leaf:
            param.requires_grad_(keep(name, param))


def trainable_state_dict_only(module: nn.Module) -> None:
    """Make ``module.state_dict()`` hold only trainable parameters (idempotent)."""
    if module in _FILTERED:
        return
    _FILTERED[module] = [
        module.register_state_dict_post_hook(_drop_frozen_entries),
        module.register_load_state_dict_post_hook(_forgive_frozen_missing),
    ]


@contextlib.contextmanager
def full_state_dict(module: nn.Module) -> Iterator[nn.Module]:
    """Within this block ``module.state_dict()`` is complete again, even after
    ``freeze_module(set_state_dict=True)``.

    Example:
        >>> with deltadist.full_state_dict(model):
        ...     torch.save(model.state_dict(), "full.pt")  # doctest: +SKIP
    """
    _SUSPENDED.add(module)
    try:
        yield module
    finally:
        _SUSPENDED.discard(module)


def _is_frozen_entry(module: nn.Module) -> Callable[[str], bool]:
    """Predicate on raw state-dict keys relative to ``module``: frozen parameter or buffer."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return lambda key: key not in trainable


def _drop_frozen_entries(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if module in _SUSPENDED:
        return
    frozen = _is_frozen_entry(module)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if frozen(key[len(prefix):]):
            del state_dict[key]


def _forgive_frozen_missing(module: nn.Module, incompatible_keys: Any) -> None:
    # The hook sees keys relative to the module load_state_dict was called on (maybe a DDP or
    # DeepSpeed wrapper around ours), so compare canonical names.
    frozen = {canonical_name(n) for n, p in module.named_parameters() if not p.requires_grad}
    frozen |= {canonical_name(n) for n, _ in module.named_buffers()}
    missing = incompatible_keys.missing_keys
    for key in list(missing):
        name = canonical_name(key)
        if name in frozen or name.removeprefix("module.") in frozen:
            missing.remove(key)
