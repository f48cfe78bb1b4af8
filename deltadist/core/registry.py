"""The delta types ``AutoDeltaConfig`` / ``AutoDeltaModel`` know, by ``delta_type``.

A method registers its delta class with :func:`register_method` where the class is defined; this
table is the only list of methods (nothing else names them), so a new method is one new file.
"""

from __future__ import annotations

from typing import Any, TypeVar

from deltadist.core.config import canonical_delta_type, check_delta_type
from deltadist.errors import ConfigError, closest

DeltaClass = TypeVar("DeltaClass", bound=type)

DELTA_MODELS: dict[str, Any] = {}
"""``delta_type`` -> the delta class (a ``DeltaBase`` subclass), in registration order."""


def register_method(cls: DeltaClass) -> DeltaClass:
    """Class decorator: make ``cls`` the delta class of ``cls.delta_type``.

    Raises:
        ConfigError: another class already registered that ``delta_type``.
    """
    delta_type = canonical_delta_type(cls.delta_type)
    known = DELTA_MODELS.get(delta_type)
    if known is not None and known is not cls:
        raise ConfigError(f"delta_type {delta_type!r} is registered already (by {known.__qualname__}); "
                          f"give {cls.__qualname__} another delta_type.")
    DELTA_MODELS[delta_type] = cls
    return cls


def delta_model_class(delta_type: object) -> Any:
    """The delta class for ``delta_type``.

    Raises:
        ConfigError: not a string, or an unknown type (the known ones are listed).
    """
    check_delta_type(delta_type)
    delta_type = canonical_delta_type(delta_type)
    if delta_type not in DELTA_MODELS:
        near = closest(str(delta_type), DELTA_MODELS, 2)
        raise ConfigError(
            f"Unknown delta_type {delta_type!r} (did you mean {' or '.join(map(repr, near))}?). "
            f"Known delta types: {', '.join(sorted(DELTA_MODELS))}."
        )
    return DELTA_MODELS[delta_type]
