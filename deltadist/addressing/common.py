"""Common structure names of a user's model, found through the structure maps.

A family is recognised by ``config.model_type`` on any submodule (so ``Wrapped(Wrapped(t5))`` and
dual encoders work), and each family's map is applied only inside the subtree that carries that
config. A plain ``nn.Module`` without a config falls back to the map whose templates match the
most module names.
"""

from __future__ import annotations

from torch import nn

from deltadist.addressing.names import canonical_modules
from deltadist.addressing.structures import STRUCTURE_MAPS, StructureMap


def _family_of(module: nn.Module) -> StructureMap | None:
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    for smap in STRUCTURE_MAPS:
        if model_type in smap.model_types:
            return smap
    return None


def _scopes(modules: dict[str, nn.Module]) -> list[tuple[str, StructureMap]]:
    """(canonical prefix, map) for each outermost module carrying a known config."""
    scopes: list[tuple[str, StructureMap]] = []
    for name, module in modules.items():
        smap = _family_of(module)
        if smap is None:
            continue
        inside = any(s is smap and _within(name, prefix) for prefix, s in scopes)
        if not inside:
            scopes.append((name, smap))
    if scopes:
        return scopes
    best = max(STRUCTURE_MAPS, key=lambda s: sum(bool(s.common_names(n)) for n in modules))
    return [("", best)] if any(best.common_names(n) for n in modules) else []


def _within(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def common_name_index(root: nn.Module) -> dict[str, tuple[str, ...]]:
    """Canonical module name -> common names, for every module that plays a role.

    Returns:
        An empty dict when no family is recognised.
    """
    modules = canonical_modules(root)
    index: dict[str, tuple[str, ...]] = {}
    for prefix, smap in _scopes(modules):
        for name in modules:
            if _within(name, prefix):
                relative = name[len(prefix) + 1:] if prefix else name
                commons = smap.common_names(relative)
                if commons:
                    index[name] = tuple(dict.fromkeys(index.get(name, ()) + commons))
    return index


def families(root: nn.Module) -> list[str]:
    """Names of the families recognised in ``root`` (for messages and ``log()``)."""
    return [smap.family for _, smap in _scopes(canonical_modules(root))]
