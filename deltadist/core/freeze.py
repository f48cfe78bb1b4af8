"""Freezing: ``requires_grad`` on leaf parameters, and the trainable-only state dict.

Freezing only flips ``requires_grad`` on leaf parameters, so it is safe before or after an engine
wraps the model, and it remembers the flags it replaced so ``detach()`` can put them back. The
trainable-only state dict (OpenDelta's ``set_state_dict=True``) is a set of state-dict hooks on
the backbone, never a reassigned ``state_dict`` method:

* a state-dict post-hook drops every frozen parameter and every buffer from ``state_dict()``;
  keys are compared by canonical name, so wrappers inside the backbone that rename keys
  (``checkpoint_wrapper``, FSDP1 units) keep the delta keys;
* a load pre-hook notes whether the incoming dict carries frozen (backbone) keys, and a load
  post-hook stops ``load_state_dict(strict=True)`` from reporting the frozen keys as missing only
  when it does not: a trainable-only dict (an engine resuming) loads strictly, a dict with backbone
  keys gets every missing key reported, as without deltadist;
* ``save_pretrained`` (transformers or huggingface_hub) must never write half a model: inside it the
  state dict is whole (and while deltas are attached, :mod:`deltadist.core.export_guard` refuses
  the save with the ways out).

Several deltas may ask for the filter on one backbone; the hooks stay until the last one lets go.
Under FSDP1 the state dict stays whole (its root unit's own hook needs every parameter).
:func:`deltadist.full_state_dict` gives the whole state dict back for a block.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from torch import nn
from torch.utils.hooks import RemovableHandle

from deltadist.addressing.names import canonical_name
from deltadist.core.export_guard import inside_save_pretrained, is_suspended
from deltadist.engines import detect_engine

ChangedFlags = dict[int, tuple[nn.Parameter, bool]]
"""``id(param) -> (param, previous requires_grad)`` for the flags a freeze replaced."""


def set_trainable(params: Iterable[nn.Parameter], keep: Callable[[nn.Parameter], bool]) -> ChangedFlags:
    """Set ``requires_grad = keep(param)`` on every leaf parameter; return the flags replaced."""
    changed: ChangedFlags = {}
    for param in params:
        if not param.is_leaf:
            continue
        wanted = bool(keep(param))
        if param.requires_grad != wanted:
            changed.setdefault(id(param), (param, param.requires_grad))
            param.requires_grad_(wanted)
    return changed


def restore_flags(changed: ChangedFlags) -> None:
    """Put back the flags :func:`set_trainable` replaced, where nobody has changed them since."""
    for param, previous in changed.values():
        if param.is_leaf and param.requires_grad != previous:
            param.requires_grad_(previous)


@dataclass
class _Filter:
    """The hooks of one backbone's trainable-only state dict and who asked for them."""

    handles: list[RemovableHandle]
    owners: set[int] = field(default_factory=set)
    incoming_has_frozen: bool = False
    """Whether the dict being loaded now names frozen parameters or buffers (a full dict)."""


_FILTERS: "weakref.WeakKeyDictionary[nn.Module, _Filter]" = weakref.WeakKeyDictionary()


def filter_state_dict(module: nn.Module, owner: object) -> None:
    """Make ``module.state_dict()`` hold only trainable parameters while ``owner`` asks for it."""
    entry = _FILTERS.get(module)
    if entry is None:
        entry = _FILTERS[module] = _Filter(handles=[
            module.register_state_dict_post_hook(_drop_frozen_entries),
            module.register_load_state_dict_pre_hook(_note_incoming_keys),
            module.register_load_state_dict_post_hook(_forgive_frozen_missing),
        ])
    entry.owners.add(id(owner))


def release_state_dict(module: nn.Module, owner: object) -> None:
    """``owner`` no longer asks for the filter; the hooks go when nobody does."""
    entry = _FILTERS.get(module)
    if entry is None:
        return
    entry.owners.discard(id(owner))
    if not entry.owners:
        for handle in entry.handles:
            handle.remove()
        del _FILTERS[module]


def _frozen_names(module: nn.Module) -> set[str]:
    """Canonical names of ``module``'s frozen parameters and of its buffers."""
    frozen = {canonical_name(n) for n, p in module.named_parameters() if not p.requires_grad}
    return frozen | {canonical_name(n) for n, _ in module.named_buffers()}


def _drop_frozen_entries(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if is_suspended(module) or not detect_engine(module).trainable_only_state_dict:
        return
    if inside_save_pretrained(module):
        return  # an export writes the whole model (an attached delta's own guard refuses it)
    trainable = {canonical_name(n) for n, p in module.named_parameters() if p.requires_grad}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if canonical_name(key[len(prefix):]) not in trainable:
            del state_dict[key]


def _note_incoming_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict,
                        strict: bool, missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    entry = _FILTERS.get(module)
    if entry is None:
        return
    frozen = _frozen_names(module)
    entry.incoming_has_frozen = any(
        canonical_name(key[len(prefix):]) in frozen for key in state_dict if key.startswith(prefix)
    )


def _forgive_frozen_missing(module: nn.Module, incompatible_keys: Any) -> None:
    entry = _FILTERS.get(module)
    if entry is None or entry.incoming_has_frozen:
        return  # a dict with backbone keys is a full dict: every missing key counts
    # The hook sees keys relative to the module load_state_dict was called on (maybe a DDP or
    # DeepSpeed wrapper around ours), so compare canonical names.
    frozen = _frozen_names(module)
    missing = incompatible_keys.missing_keys
    for key in list(missing):
        name = canonical_name(key)
        if name in frozen or name.removeprefix("module.") in frozen:
            missing.remove(key)
