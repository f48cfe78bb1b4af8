"""The YAML side of the job's config: files (with ``include:``), ``--set KEY=VALUE`` overrides, and
YAML errors told as the file, line and column where the parser gave up."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from deltadist.errors import ConfigError

INCLUDE_KEY = "include"
"""Top-level key of a config file naming a base file to read first (see :func:`read_config_file`)."""


def read_config_file(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping in the YAML file ``path``, with its ``include:`` resolved.

    ``include: base.yaml`` (a path relative to the including file) reads that file first and then
    merges this one over it: mappings key by key, anything else (lists too) replaced -- except a
    ``delta`` section of another ``delta_type``, which replaces the base's whole (the other
    method's arguments would not apply). Includes may nest; a cycle is an error.
    """
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise ConfigError(f"include cycle: {chain}.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); "
                          "save the config as UTF-8.") from err
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark, problem = _yaml_problem(err, text)
        where = f":{mark[0]}:{mark[1]}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}; fix the YAML there.") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config file must hold a mapping, got {type(raw).__name__}.")
    if INCLUDE_KEY not in raw:
        return raw
    base_name = raw.pop(INCLUDE_KEY)
    if not isinstance(base_name, str) or not base_name:
        raise ConfigError(f"{path}: {INCLUDE_KEY} must be a file name, got {base_name!r}.")
    base = read_config_file(path.parent / base_name, (*_seen, resolved))
    if _delta_type(raw) not in (None, _delta_type(base)):
        base.pop("delta", None)
    return _merge(base, raw)


def _delta_type(raw: Mapping[str, Any]) -> Any:
    delta = raw.get("delta")
    return delta.get("delta_type") if isinstance(delta, Mapping) else None


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``raw[a][b] = value`` for ``item = "a.b=value"`` (value parsed as YAML)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set needs KEY=VALUE (e.g. training.epochs=1), got {item!r}.")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section.")
        node = child
    try:
        node[leaf] = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        mark, problem = _yaml_problem(err, text)
        where = f" at {_position(*mark, text)}" if mark else ""
        raise ConfigError(
            f"--set {item!r}: the value is not valid YAML{where}: {problem}; fix it (a list is "
            "[a, b]) or, to pass it as a string, put it in YAML quotes: KEY='VALUE'."
        ) from err


def _yaml_problem(err: yaml.YAMLError, text: str) -> tuple[tuple[int, int] | None, str]:
    """``((line, column), problem)`` of a YAML parse error of ``text`` (1-based), or ``(None, message)``.

    The position is where the parser gave up (``problem_mark``); the problem names its context too
    (e.g. "while parsing a flow sequence") and where that unfinished construct started.
    """
    if isinstance(err, yaml.reader.ReaderError):  # a character YAML does not allow: no marks
        before = text[:err.position]
        mark = (before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1)
        code = err.character if isinstance(err.character, int) else ord(err.character)
        return mark, f"unacceptable character #x{code:04x}: {err.reason}"
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return None, " ".join(str(err).split())
    problem = err.problem or "syntax error"
    if err.context and err.context_mark is not None:
        start = err.context_mark
        problem += f" ({err.context} started at {_position(start.line + 1, start.column + 1, text)})"
    return (err.problem_mark.line + 1, err.problem_mark.column + 1), problem


def _position(line: int, column: int, text: str) -> str:
    """``"line L, column C"``; just ``"column C"`` in a one-line ``text`` (a ``--set`` value)."""
    return f"column {column}" if "\n" not in text.strip() else f"line {line}, column {column}"


RUN_CONFIG_NAME = "config.yaml"
"""The resolved config a run writes into its ``output_dir`` (what ``deltadist predict/eval --run``
read; ``deltadist train --config`` runs it again)."""


def write_run_config(raw: Mapping[str, Any], output_dir: str | os.PathLike) -> Path:
    """Write the resolved config ``raw`` to ``output_dir/config.yaml`` atomically (a temporary file
    renamed over the old one)."""
    path = Path(output_dir) / RUN_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ("# The resolved config of this deltadist train run (deltadist predict / eval --run read it;\n"
            "# deltadist train --config runs it again).\n" + yaml.safe_dump(dict(raw), sort_keys=False))
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path
