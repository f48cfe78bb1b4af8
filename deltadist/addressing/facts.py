"""Per-family facts beyond roles, asked of the structure maps (the code names no family itself).

* :func:`weight_is_transposed` -- a linear layer storing its weight ``[in, out]``, by class name,
  from every registered map's ``transposed_linear_classes``;
* :func:`config_value` -- a model config's value for a fact named by config attributes
  (``head_size_attrs``...), from the map of the config's ``model_type``; a config of no known family
  is asked every name any registered map knows.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from deltadist.addressing.structures import STRUCTURE_MAPS, StructureMap, structure_map_for

_ATTR_FACTS: dict[str, tuple[str, ...]] = {
    f.name: f.default for f in fields(StructureMap) if f.name.endswith("_attrs")
}
"""Every ``StructureMap`` fact naming config attributes, with its default names."""


def weight_is_transposed(module: object) -> bool:
    """Whether ``module``'s class stores a linear weight ``[in, out]`` (a registered map says so)."""
    name = type(module).__name__
    return any(name in smap.transposed_linear_classes for smap in STRUCTURE_MAPS)


def config_attr_names(config: object, fact: str) -> tuple[str, ...]:
    """The config attributes that give ``fact`` (a ``StructureMap`` field ending in ``_attrs``).

    The map serving ``config.model_type`` says; for a config of no known family (or ``None``), the
    field's default names, then every registered map's, in order, without repeats.

    Raises:
        ValueError: ``fact`` is no such field.
    """
    if fact not in _ATTR_FACTS:
        raise ValueError(f"{fact!r} is not a structure-map fact naming config attributes; "
                         f"expected one of {sorted(_ATTR_FACTS)}.")
    smap = structure_map_for(getattr(config, "model_type", None))
    if smap is not None:
        return getattr(smap, fact)
    groups = (_ATTR_FACTS[fact], *(getattr(s, fact) for s in STRUCTURE_MAPS))
    return tuple(dict.fromkeys(name for group in groups for name in group))


def config_value(config: object, fact: str) -> Any:
    """``config``'s value for ``fact``: that of the first of its attributes that is set (truthy),
    else the last one's (``None`` when absent), as ``getattr(c, a, None) or getattr(c, b, None)``."""
    value = None
    for name in config_attr_names(config, fact):
        value = getattr(config, name, None)
        if value:
            return value
    return value
