"""Typed delta configs: one dataclass per method, loaded from dicts through an allow-list.

Unknown keys are errors that list the valid ones; values are checked in ``__post_init__`` with
messages naming the field, the value and what the field takes: first every field against its declared
type (:func:`check_field_types`, for every method: a bool is not an int, an int is a number), then
each method's ranges and choices. Configs are plain data (JSON-able), never pickled.
"""

from __future__ import annotations

import dataclasses
import functools
import reprlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping, TypeVar

from deltadist.errors import ConfigError, closest

CONFIG_FORMAT_VERSION = 1
C = TypeVar("C", bound="DeltaConfig")

DELTA_TYPE_ALIASES = {"lowrankadapter": "low_rank_adapter"}
"""Other spellings of a ``delta_type`` (OpenDelta's), accepted wherever one is read."""


def canonical_delta_type(delta_type: object) -> object:
    """``delta_type`` with OpenDelta's spellings mapped to deltadist's."""
    return DELTA_TYPE_ALIASES.get(delta_type, delta_type) if isinstance(delta_type, str) else delta_type


def check_delta_type(delta_type: object) -> None:
    """Raise :class:`ConfigError` unless ``delta_type`` is a string (whether a known one is not checked)."""
    if not isinstance(delta_type, str):
        raise ConfigError(f"delta_type must be a string naming the method (e.g. 'lora'), got {shown(delta_type)}.")


DELTA_DTYPES = ("auto", "site", "float32", "float16", "bfloat16", "float64")
"""Values of ``delta_dtype``."""

# Keys written by save_finetuned for provenance; accepted on load, not passed to the method.
PROVENANCE_KEYS = frozenset(
    {"format_version", "library_versions", "save_id", "checkpoint_keys", "weights_sha256"}
)
OPENDELTA_BACKENDS = ("hf", "bmt")
"""OpenDelta's ``backend`` switch (transformers or BMTrain modules): accepted and not stored, since
deltadist detects the engine from the model itself."""


@dataclass(kw_only=True)
class DeltaConfig:
    """Fields shared by every delta method (OpenDelta's ``BaseDeltaConfig``)."""

    delta_type: ClassVar[str] = ""

    modified_modules: list[str] | None = None
    """Patterns of the modules to modify; ``None`` uses the method's default roles."""
    exclude_modules: list[str] | None = None
    """Patterns whose modules (and their subtrees) are never modified."""
    unfrozen_modules: list[str] | None = None
    """Patterns of what ``freeze_module()`` keeps trainable and the delta saves: ``"deltas"`` (this
    delta's parameters) and backbone modules or parameter names. ``None``: ``"deltas"`` plus the
    model's task head (``classifier``, ``score``, ...) when the structure maps know the model."""
    delta_dtype: str = "auto"
    """dtype of new delta parameters: ``"auto"`` (float32 on float16/bfloat16 sites, else the
    site's), ``"site"`` (always the site's), or a dtype name (``"float32"``, ``"bfloat16"``...)."""
    common_structure: bool = False
    """Match ``modified_modules`` against common-structure names (``attn.q``) instead of real ones."""
    delta_name: str | None = None
    """The delta's name on its model (``deltadist.deltas_on(model)["french"]``); unique per model.
    ``None``: a default ``<delta_type>_<n>`` is given at attach (not stored in the config)."""
    backbone_class: str | None = None
    """Class name of the backbone the delta was trained on (provenance)."""
    backbone_checkpoint_name: str | None = None
    """Name or path of the backbone checkpoint (provenance)."""
    backbone_hash: str | None = None
    """Backbone fingerprint digest at save time; checked by ``from_finetuned`` unless
    ``check_hash=False``."""
    backbone_samples: str | None = field(default=None, repr=False)
    """The fingerprint's sampled values (``structure:base64``), so that the same checkpoint in
    another dtype (fp16, bf16) is recognised within rounding error."""

    PATTERN_FIELDS: ClassVar[tuple[str, ...]] = ("modified_modules", "exclude_modules", "unfrozen_modules")
    """Fields holding module patterns: a list, or one pattern string (taken as a one-item list)."""
    EXPECTED: ClassVar[dict[str, str]] = {
        **dict.fromkeys(PATTERN_FIELDS, "a list of strings (module name patterns), one pattern string, "
                                        "or None"),
        "delta_name": "a non-empty string without surrounding spaces, or None",
    }
    """What a field accepts, in words, where its type alone does not say it (for error messages)."""

    def __post_init__(self) -> None:
        for name in self.PATTERN_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif value is not None:
                if isinstance(value, (bytes, bytearray, Mapping)) or not isinstance(value, Iterable):
                    raise self.type_error(name, value)
                setattr(self, name, [self._pattern(name, v, value) for v in value])
        check_field_types(self)
        name = self.delta_name
        if name is not None and (not name.strip() or name != name.strip()):
            raise self.type_error("delta_name", name)
        if self.delta_dtype not in DELTA_DTYPES:
            raise ConfigError(
                f"delta_dtype must be one of {', '.join(map(repr, DELTA_DTYPES))}, got {self.delta_dtype!r}."
            )
        if self.modified_modules is not None and not self.modified_modules:
            raise ConfigError(
                "modified_modules=[] selects nothing. Pass None for the method's defaults, or list "
                "module names."
            )

    def _pattern(self, field_name: str, item: Any, value: Any) -> Any:
        """One item of a pattern list, checked (methods that take more than names override it)."""
        if not isinstance(item, str):
            raise self.type_error(field_name, value, f"an item is {shown(item)}")
        return item

    @classmethod
    def type_error(cls, name: str, value: Any, detail: str = "") -> ConfigError:
        """The error for a value of field ``name`` that is not what the field accepts."""
        expected = cls.EXPECTED.get(name) or describe_type(field_types(cls)[name])
        return ConfigError(f"{name} must be {expected}, got {shown(value)}{f': {detail}' if detail else ''}.")

    @classmethod
    def field_names(cls) -> list[str]:
        """The config's field names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], config: Mapping[str, Any], **overrides: Any) -> C:
        """Build a config from a dict (``delta_type`` and provenance keys allowed), checking keys.

        Raises:
            ConfigError: a key is not a field of this config (the valid keys are listed), or a
                ``delta_type`` in the dict is not this config's.
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"A delta config must be a mapping of field names to values, got {shown(config)}.")
        merged = {**config, **overrides}
        delta_type = canonical_delta_type(merged.pop("delta_type", cls.delta_type))
        check_delta_type(delta_type)
        if delta_type != cls.delta_type:
            raise ConfigError(
                f"{cls.__name__} is for delta_type {cls.delta_type!r}, got {delta_type!r}. "
                "Use AutoDeltaConfig.from_dict to pick the class from delta_type."
            )
        for key in PROVENANCE_KEYS:
            merged.pop(key, None)
        backend = merged.pop("backend", "hf")
        if backend not in OPENDELTA_BACKENDS:
            choices = ", ".join(map(repr, OPENDELTA_BACKENDS))
            raise ConfigError(f"backend must be one of {choices} (OpenDelta's switch), got {shown(backend)}; "
                              "deltadist detects the engine from the model, so the key can be left out.")
        valid = cls.field_names()
        unknown = [k for k in merged if k not in valid]
        if unknown:
            hints = "; ".join(f"{k!r} (closest: {', '.join(closest(str(k), valid, 3))})" for k in unknown)
            raise ConfigError(
                f"Unknown key(s) for delta_type {cls.delta_type!r}: {hints}. "
                f"Valid keys: {', '.join(valid)}."
            )
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that :meth:`from_dict` turns back into an equal config."""
        return {"delta_type": self.delta_type, **dataclasses.asdict(self)}

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (validated like a new config)."""
        return type(self).from_dict({**self.to_dict(), **changes})


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80
_WORDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
          bool: ("a bool (true or false)", "bools"), type(None): ("None", "None")}


def shown(value: Any) -> str:
    """``value`` for an error message: its (shortened) repr and its type, ``7 (int)``."""
    return f"{_REPR.repr(value)} ({type(value).__name__})"


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """The declared type of each field of the config class ``cls`` (annotations resolved)."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):  # a class whose annotations its module cannot resolve (a
        try:                             # local type) leaves its own fields unchecked, not its bases'
            hints.update(typing.get_type_hints(klass))
        except (NameError, TypeError):
            continue
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def describe_type(tp: Any, plural: bool = False) -> str:
    """A type in words: ``list[str] | None`` -> "a list of strings or None"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a, plural) for a in sorted(args, key=lambda a: a is type(None)))
    if origin is list:
        return f"{'lists' if plural else 'a list'} of {describe_type(args[0], True)}"
    if origin is dict:
        return (f"{'mappings' if plural else 'a mapping'} of {describe_type(args[0], True)} to "
                f"{describe_type(args[1], True)}")
    return _WORDS[tp][plural] if tp in _WORDS else str(tp)


def checkable(tp: Any) -> bool:
    """Whether :func:`conforms` knows the type ``tp`` (every field of a shipped method's config)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType, list, dict):
        return all(checkable(a) for a in args)
    return tp in _WORDS


def conforms(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of the type ``tp``: a bool is not an int nor a number; an int is a number.

    Types :func:`checkable` does not know accept anything.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is list:
        return isinstance(value, (list, tuple)) and all(conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, Mapping) and all(
            conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items())
    if tp in (int, float):
        return isinstance(value, int if tp is int else (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp) if tp in _WORDS else True


def check_field_types(config: DeltaConfig) -> None:
    """Raise :class:`ConfigError` for the first field whose value is not of its declared type.

    The pattern fields (:attr:`DeltaConfig.PATTERN_FIELDS`) are checked by their own rules.
    """
    for name, tp in field_types(type(config)).items():
        if name not in config.PATTERN_FIELDS and not conforms(getattr(config, name), tp):
            raise config.type_error(name, getattr(config, name))


def check_positive_int(config: DeltaConfig, name: str) -> None:
    """Raise :class:`ConfigError` unless ``config.<name>`` is an int of at least 1."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")


def check_range(config: DeltaConfig, name: str, low: float, high: float) -> None:
    """Check ``low <= value < high``."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        raise ConfigError(f"{name} must be a number in [{low}, {high}), got {value!r}.")


def check_choice(config: DeltaConfig, name: str, choices: Iterable[str],
                 case_insensitive: bool = False) -> None:
    """Check that the field ``name`` is one of ``choices``."""
    value = getattr(config, name)
    known = list(choices)
    test = value.lower() if case_insensitive and isinstance(value, str) else value
    if test not in known:
        near = closest(str(value), known, 3)
        raise ConfigError(
            f"{name} must be one of {', '.join(map(repr, known))}, got {value!r} "
            f"(closest: {', '.join(near)})."
        )
