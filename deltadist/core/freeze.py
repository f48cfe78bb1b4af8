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
  state dict is whole, and while deltas are attached the save is refused with the ways out (their
  weights would be dropped by ``from_pretrained``).

Several deltas may ask for the filter on one backbone; the hooks stay until the last one lets go.
Under FSDP1 the state dict stays whole (its root unit's own hook needs every parameter).
:func:`full_state_dict` gives the whole state dict back for a block.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle

from deltadist.addressing.names import canonical_name
from deltadist.core.attach import delta_modules
from deltadist.engines import detect_engine
from deltadist.errors import ExportError

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
_SUSPENDED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


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


def _frozen_names(module: nn.Module) -> set[str]:
    """Canonical names of ``module``'s frozen parameters and of its buffers."""
    frozen = {canonical_name(n) for n, p in module.named_parameters() if not p.requires_grad}
    return frozen | {canonical_name(n) for n, _ in module.named_buffers()}


def _drop_frozen_entries(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if module in _SUSPENDED or not detect_engine(module).trainable_only_state_dict:
        return
    if _inside_save_pretrained(module):
        _refuse_export_with_deltas(module)
        return  # an export writes the whole model
    trainable = {canonical_name(n) for n, p in module.named_parameters() if p.requires_grad}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if canonical_name(key[len(prefix):]) not in trainable:
            del state_dict[key]


def _inside_save_pretrained(module: nn.Module) -> bool:
    """Whether a ``save_pretrained`` of ``module`` or of a model containing it is running.

    Why the call stack: transformers' and huggingface_hub's ``save_pretrained`` get the weights
    from ``state_dict()`` like every other caller; nothing else tells an export apart from an
    engine's or a trainer's checkpoint, which must keep getting the trainable-only dict.
    """
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "save_pretrained":
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and any(m is module for m in owner.modules()):
                return True
        frame = frame.f_back
    return False


def _refuse_export_with_deltas(module: nn.Module) -> None:
    attached = sorted(canonical_name(n) for n in delta_modules(module))
    if attached:
        raise ExportError(
            f"save_pretrained() would write {len(attached)} delta modules (e.g. {attached[0]!r}) as "
            "extra weights that from_pretrained() drops, so the export would silently lose the "
            "delta. To export a model with the delta folded in: "
            "delta.merge_and_unload().save_pretrained(path). To keep the delta separate: "
            "delta.save_finetuned(path) (and save the backbone before attaching). To write the "
            "backbone and the delta weights as they are: with deltadist.full_state_dict(model): "
            "model.save_pretrained(path)."
        )


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
