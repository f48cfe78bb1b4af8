"""Where a split's rows come from: ``data.train`` / ``data.eval`` as one source or a list of them,
each with its own column mapping, and the training sources' mixing weights.

A source is a file, a ``save_to_disk`` folder or a cached dataset name (read by
:mod:`deltadist.training.data_files`). Several training sources are mixed by weight: an epoch is
:meth:`Mixture.draw`'s order, a function of the seed and the epoch only, like a single source's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from deltadist.errors import ConfigError

COLUMN_FIELDS = ("prompt", "completion", "text", "label")
"""The fields a column mapping may name (chat rows' column is ``data.messages_field``)."""
SOURCE_KEYS = ("path", "weight", "columns", "config")


@dataclass(frozen=True)
class Source:
    """One source of rows."""

    path: str
    """A file, a ``save_to_disk`` folder, or a cached dataset ``user/name`` (``:split``)."""
    weight: float = 1.0
    """Its share of a mixed epoch, relative to the other training sources' weights."""
    columns: Mapping[str, str] = field(default_factory=dict)
    """Field -> the source's column holding it (``{"prompt": "question"}``)."""
    config: str | None = None
    """A cached dataset's config name; ``None``: its only (or default) one."""


def parse_sources(value: str | list[Any], columns: Mapping[str, str], key: str) -> list[Source]:
    """The sources ``value`` (``data.train`` or ``data.eval``) names: a path, or a list of paths
    and ``{path, weight, columns, config}`` mappings; ``columns`` (``data.columns``) is every
    source's mapping, which a source's own ``columns`` extends.

    Raises:
        ConfigError: an empty list, an unknown key, a weight that is not a positive number, a
            column mapping that is not field -> column name.
    """
    check_columns(columns, "data.columns")
    if isinstance(value, str):
        return [Source(value, columns=dict(columns))]
    if not value:
        raise ConfigError(f"{key} is an empty list; give a path, or a list of paths or "
                          "{path: ..., weight: ...} sources.")
    return [_source(item, columns, f"{key}[{index}]") for index, item in enumerate(value)]


def _source(item: Any, columns: Mapping[str, str], key: str) -> Source:
    if isinstance(item, str):
        return Source(item, columns=dict(columns))
    if not isinstance(item, Mapping) or not isinstance(item.get("path"), str):
        raise ConfigError(f"{key} must be a path or a mapping with a path (and weight, columns, config), "
                          f"got {item!r}.")
    unknown = [str(k) for k in item if k not in SOURCE_KEYS]
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {', '.join(unknown)}; a source takes "
                          f"{', '.join(SOURCE_KEYS)}.")
    weight = item.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
        raise ConfigError(f"{key}.weight must be a positive number, got {weight!r}.")
    config = item.get("config")
    if config is not None and not isinstance(config, str):
        raise ConfigError(f"{key}.config must be a dataset config name, got {config!r}.")
    own = item.get("columns") or {}
    check_columns(own, f"{key}.columns")
    return Source(item["path"], float(weight), {**columns, **own}, config)


def check_columns(columns: Any, key: str) -> None:
    """``columns`` maps fields of :data:`COLUMN_FIELDS` to column names."""
    if not isinstance(columns, Mapping):
        raise ConfigError(f"{key} must map fields to column names, e.g. {{prompt: question}}, "
                          f"got {columns!r}.")
    for name, column in columns.items():
        if name not in COLUMN_FIELDS:
            raise ConfigError(f"{key}: {name!r} is not a field; map {', '.join(COLUMN_FIELDS)} to your "
                              "column names (chat rows: data.messages_field).")
        if not isinstance(column, str) or not column:
            raise ConfigError(f"{key}.{name} must be a column name, got {column!r}.")


def map_columns(dataset: Any, columns: Mapping[str, str], shown: str, key: str) -> tuple[Any, str]:
    """``dataset`` with each mapped column renamed to its field, and how errors name the source
    (``"qa.jsonl (question as prompt)"``). A column the field's name already held is dropped.

    Raises:
        ConfigError: a mapped column is not in the data.
    """
    renames = {column: name for name, column in columns.items() if column != name}
    for name, column in columns.items():
        if column not in dataset.column_names:
            raise ConfigError(f"{key}: {shown} has no '{column}' column, which the column mapping gives as "
                              f"{name} (it has: {', '.join(dataset.column_names)}); fix the mapping.")
    if not renames:
        return dataset, shown
    shadowed = [name for name in renames.values() if name in dataset.column_names and name not in renames]
    dataset = dataset.remove_columns(shadowed).rename_columns(renames)
    return dataset, f"{shown} ({', '.join(f'{c} as {n}' for c, n in renames.items())})"


@dataclass(frozen=True)
class Mixture:
    """Training examples from several sources, held one source after another, and their weights.

    An epoch has as many examples as all sources together (``N``). Source ``i`` gets ``n_i`` of
    them, ``N * w_i / sum(w)`` rounded by largest remainder (ties to the earlier source); it gives
    each of its ``s_i`` examples ``n_i // s_i`` times plus ``n_i % s_i`` examples drawn without
    replacement, and the ``N`` are shuffled together. A source with fewer examples than its share
    is thus repeated as evenly as possible; one with more gives a fresh random subset each epoch.
    """

    sizes: tuple[int, ...]
    weights: tuple[float, ...]

    def counts(self) -> list[int]:
        """Examples each source gives an epoch (``n_i``); they sum to ``sum(sizes)``."""
        total, whole = sum(self.sizes), sum(self.weights)
        exact = [total * w / whole for w in self.weights]
        counts = [math.floor(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
        for i in by_remainder[:total - sum(counts)]:
            counts[i] += 1
        return counts

    def draw(self, generator: torch.Generator) -> list[int]:
        """One epoch's example indices (into the sources' examples, concatenated) from ``generator``."""
        order: list[int] = []
        start = 0
        for size, count in zip(self.sizes, self.counts()):
            repeats, rest = divmod(count, size)
            order += list(range(start, start + size)) * repeats
            order += [start + i for i in torch.randperm(size, generator=generator)[:rest].tolist()]
            start += size
        return [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
