"""A typed config from nested dicts: a dataclass tree built from what YAML gives, every key and
value checked against its field (unknown keys listed with the valid ones, a close match offered),
and the tree described for ``--help``. The job's own schema is :mod:`deltadist.training.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Mapping, Sequence

import yaml

from deltadist.errors import ConfigError


def build(cls: type, raw: Any, section: str) -> Any:
    """``cls(**raw)`` after checking ``raw``'s keys and values; ``section`` is its dotted name."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{section or 'the config'} must be a mapping, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [str(k) for k in raw if k not in valid]
    if unknown:
        hints_text = "".join(
            f" (did you mean {close[0]}?)" if (close := difflib.get_close_matches(k, valid, n=1)) else ""
            for k in unknown[:1]
        )
        raise ConfigError(
            f"Unknown key(s) in {section or 'the config'}: {', '.join(unknown)}{hints_text}. "
            f"Valid keys: {', '.join(valid)}."
        )
    return cls(**{
        key: _value(hints[key], value, f"{section}.{key}" if section else key)
        for key, value in raw.items()
    })


def _value(hint: Any, value: Any, name: str) -> Any:
    """``value`` checked against the field type ``hint`` (ints are accepted as floats)."""
    if dataclasses.is_dataclass(hint):
        return build(hint, value, name)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # ``X | None``
        arms = [arm for arm in typing.get_args(hint) if arm is not type(None)]
        if value is None and len(arms) < len(typing.get_args(hint)):
            return None
        if len(arms) == 1:
            return _value(arms[0], value, name)
        for arm in arms:  # ``str | list[...]``: the arm whose type the value has
            if isinstance(value, typing.get_origin(arm) or arm) and not isinstance(value, bool):
                return _value(arm, value, name)
        kinds = " or ".join((typing.get_origin(arm) or arm).__name__ for arm in arms)
        raise ConfigError(f"{name} must be of type {kinds}, got {value!r}.")
    expected = typing.get_origin(hint) or hint
    if expected is float and not isinstance(value, bool) and isinstance(value, (int, str)):
        try:  # YAML 1.1 reads "1e-3" as a string
            value = float(value)
        except (ValueError, OverflowError):
            pass
    if isinstance(value, bool) and expected is not bool or not isinstance(value, expected):
        raise ConfigError(f"{name} must be of type {expected.__name__}, got {value!r}.")
    check_finite(value, name)
    return value


def check_positive(section: Any, prefix: str, *names: str) -> None:
    """Each named field is positive (or ``None``, for the optional ones)."""
    for name in names:
        value = getattr(section, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{prefix}.{name} must be positive, got {value!r}.")


def check_finite(value: Any, name: str) -> None:
    """Every float in ``value`` (a number, or a mapping or list of them) is finite: not nan or inf."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}; give a number "
                          "(nan and inf are not values a job can train with).")
    if isinstance(value, Mapping):
        for key, item in value.items():
            check_finite(item, f"{name}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_finite(item, f"{name}[{index}]")


def check_choice(value: str, choices: Sequence[str], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}.")


def fields_help(root: type) -> str:
    """Every field of the dataclass tree ``root`` as ``  section.key (default ...): help``, one a
    line (the help is the field's ``metadata["help"]``)."""
    lines: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = "null" if default is None else yaml.safe_dump(
                default, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()
            lines.append(f"  {prefix}{f.name} (default {shown}): {f.metadata.get('help', '')}")

    walk(root, "")
    return "\n".join(lines)
