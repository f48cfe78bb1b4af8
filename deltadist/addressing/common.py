"""Common structure names of a user's model, found through the structure maps.

A family is recognised by ``config.model_type`` on any submodule (so ``Wrapped(Wrapped(t5))`` and
dual encoders work), and each family's map is applied only inside the subtree that carries that
config. A plain ``nn.Module`` without a config falls back to the map whose templates match the
most module names.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from deltadist.addressing.names import canonical_modules
from deltadist.addressing.structures import STRUCTURE_MAPS, StructureMap, structure_map_for


def _family_of(module: nn.Module) -> StructureMap | None:
    return structure_map_for(getattr(getattr(module, "config", None), "model_type", None))


def _scopes(modules: dict[str, nn.Module], guess: bool = True) -> list[tuple[str, StructureMap]]:
    """(canonical prefix, map) for each outermost module carrying a known config.

    With ``guess``, a model without any known config gets the best-matching map for its root.
    """
    scopes: list[tuple[str, StructureMap]] = []
    for name, module in modules.items():
        smap = _family_of(module)
        if smap is None:
            continue
        inside = any(s is smap and _within(name, prefix) for prefix, s in scopes)
        if not inside:
            scopes.append((name, smap))
    if scopes or not guess:
        return scopes
    best = max(STRUCTURE_MAPS, key=lambda s: sum(bool(s.common_names(n)) for n in modules))
    return [("", best)] if any(best.common_names(n) for n in modules) else []


def _within(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def common_name_index(root: nn.Module, guess: bool = True, role: str | None = None,
                      extra: Iterable[str] = ()) -> dict[str, tuple[str, ...]]:
    """Canonical module name -> common names, for every module that plays a role.

    Args:
        root: the model.
        guess: for a model without a known ``config``, use the best-matching map anyway.
        role: only modules playing this role (a common-name template without ``$``).
        extra: more names to look up, not modules (parameter sites: ``mlp.experts.down_proj``).

    Returns:
        An empty dict when no family is recognised.
    """
    modules = canonical_modules(root)
    index: dict[str, tuple[str, ...]] = {}
    for prefix, smap in _scopes(modules, guess):
        for name in [*modules, *extra]:
            if _within(name, prefix):
                relative = name[len(prefix) + 1:] if prefix else name
                commons = smap.common_names(relative, role)
                if commons:
                    index[name] = tuple(dict.fromkeys(index.get(name, ()) + commons))
    return index


def modules_with_role(root: nn.Module, role: str, guess: bool = True) -> list[str]:
    """Canonical names of the modules whose common name is ``role`` (``"task_head"``), in order."""
    return [name for name, commons in common_name_index(root, guess, role).items() if role in commons]


def families(root: nn.Module) -> list[str]:
    """Names of the families recognised in ``root`` (for messages and ``log()``)."""
    return [smap.family for _, smap in _scopes(canonical_modules(root))]
