"""Reading a split of the user's data for ``deltadist train`` (``data.train``, ``data.eval``) into a
``datasets.Dataset``, with every problem a one-line :class:`ConfigError`.

A split is a ``.jsonl``/``.json``/``.csv``/``.parquet`` file (or a glob pattern of such files, read
one after another in sorted order), a folder written by ``save_to_disk``, or the name of a dataset
in the local ``datasets`` cache (``user/name``, ``user/name:split``; read offline unless
``HF_HUB_OFFLINE=0``). What the rows must hold, and turning them into token ids, is
:mod:`deltadist.training.text_data`'s.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from deltadist.errors import ConfigError
from deltadist.training.text_data import TEXT_FIELDS

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets is imported: the cache, never a hub

if TYPE_CHECKING:
    import datasets

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_FORMAT_NAMES = {"json": "JSON Lines or a JSON array of objects", "csv": "CSV with a header row",
                 "parquet": "Parquet"}
_FORMATS = "a .jsonl, .json, .csv or .parquet file, or a folder written by Dataset.save_to_disk"
_STREAMED = (".jsonl", ".csv", ".parquet")
"""Files ``data.streaming`` reads row by row (a JSON array is one document: it is read whole)."""
_EVAL_SPLITS = ("eval", "validation", "valid", "dev", "test")
"""Splits of a saved DatasetDict that ``data.eval`` takes, in this order of preference."""
_REASON_CHARS = 200


def load_split(path: str | os.PathLike, key: str, config: str | None = None) -> datasets.Dataset:
    """The rows of the file, saved-dataset folder or cached dataset at ``path``, via ``datasets``.

    ``.jsonl``/``.json`` load with the ``json`` builder, ``.csv`` with ``csv`` (prompt, completion and
    text columns read as strings, so ``4`` stays the text ``"4"``), ``.parquet`` with ``parquet``; a
    folder with ``load_from_disk``. A ``path`` that does not exist and looks like a dataset name
    (``user/name``, ``user/name:split``) loads with ``load_dataset`` (``config``: its config name)
    from the local cache. A ``DatasetDict`` gives its only split, else the split named like the
    key's last part (``data.train`` -> ``train``; ``data.eval`` -> the first of ``eval,
    validation, valid, dev, test``). ``key`` names the split in errors (``"data.train"``).
    """
    shown = os.fspath(path)
    path = Path(path)
    if not path.exists() and is_pattern(shown):
        dataset = _load_files(matching_files(shown, key), shown, key)
    elif not path.exists():
        if _is_dataset_name(shown):
            dataset = _load_named(shown, config, key)
        else:
            raise ConfigError(f"{key}: {shown} does not exist; check the path (relative paths are from "
                              "the directory you run deltadist train in).")
    else:
        dataset = _load_saved(path, shown, key) if path.is_dir() else _load_file(path, shown, key)
    if dataset.num_rows == 0:
        raise ConfigError(_no_rows(key, shown))
    return dataset


def is_pattern(spec: str) -> bool:
    """Whether ``spec`` is a glob pattern (``shards/train-*.jsonl``) rather than one path; a
    dataset's split may hold brackets (``user/name:train[:10%]``, datasets' slicing), its name not."""
    return any(char in spec.partition(":")[0] for char in "*?[")


def matching_files(pattern: str, key: str, suffixes: Sequence[str] = tuple(_BUILDERS)) -> list[Path]:
    """The files ``pattern`` matches (``**`` crosses folders), sorted by path: shards named
    ``train-00000-of-00008.jsonl`` ... come in their order.

    Raises:
        ConfigError: nothing matches, or the files are of several kinds, or of a kind not in
            ``suffixes``.
    """
    matched = glob.glob(os.path.expanduser(pattern), recursive=True)
    files = sorted(Path(name) for name in matched if os.path.isfile(name))
    kinds = sorted({file.suffix.lower() or "no extension" for file in files})
    readable = ", ".join(suffixes)
    if not files:
        problem = "matches no file; fix the pattern (relative paths are from the directory you run in)"
    elif len(kinds) > 1 or kinds[0] not in suffixes:
        problem = (f"matches {', '.join(kinds)} files; make it match files of one kind, one of {readable} "
                   f"(e.g. {pattern.rsplit('.', 1)[0]}{suffixes[0]})")
    else:
        return files
    raise ConfigError(f"{key}: the pattern {pattern} {problem}.")


def _load_files(files: list[Path], shown: str, key: str) -> datasets.Dataset:
    """The rows of ``files`` (of one kind), one file after another."""
    import datasets

    parts = [_load_file(file, os.fspath(file), key) for file in files]
    for file, part in zip(files[1:], parts[1:]):
        if part.features != parts[0].features:
            raise ConfigError(f"{key}: {file} holds other columns than {files[0]} ({_columns(part)} vs "
                              f"{_columns(parts[0])}); the files {shown} matches must hold the same columns.")
    return datasets.concatenate_datasets(parts)


def _columns(dataset: datasets.Dataset) -> str:
    """``"text: string, label: int64"``."""
    return ", ".join(f"{name}: {getattr(feature, 'dtype', type(feature).__name__)}"
                     for name, feature in dataset.features.items())


def streamed_files(spec: str, key: str) -> list[str]:
    """The files ``data.streaming`` reads for ``spec``: the ``.jsonl``, ``.csv`` or ``.parquet`` files
    a glob pattern matches, in sorted order, or the one file it names (checked as it is read)."""
    if is_pattern(spec) and not Path(spec).exists():
        return [os.fspath(file) for file in matching_files(spec, key, _STREAMED)]
    return [spec]


def stream_rows(path: str | os.PathLike, key: str) -> Iterator[dict[str, Any]]:
    """The rows of the ``.jsonl``, ``.csv`` or ``.parquet`` file at ``path``, one at a time, never the
    whole file in memory (``datasets``' streaming readers; CSV text columns read as strings).

    Raises:
        ConfigError: the file is missing, of another kind, or cannot be read (naming the last row read).
    """
    import datasets

    file = Path(path)
    if not file.is_file() or file.suffix.lower() not in _STREAMED:
        problem = "does not exist" if not file.exists() else "is not a .jsonl, .csv or .parquet file"
        raise ConfigError(f"{key}: {path} {problem}; data.streaming reads one .jsonl, .csv or .parquet file "
                          "row by row (set data.streaming: false for the other sources).")
    builder = _BUILDERS[file.suffix.lower()]
    options = {"converters": {field: str for field in TEXT_FIELDS}} if builder == "csv" else {}
    with _quiet_datasets():
        rows = datasets.load_dataset(builder, data_files=str(file.resolve()), split="train", streaming=True,
                                     **options)
    number = 0
    try:
        for number, row in enumerate(rows, 1):
            yield row
    except Exception as error:  # datasets' and pyarrow's exception types vary by version
        raise ConfigError(f"{key}: {path} could not be read after row {number} ({_reason(error)}); "
                          "fix the file.") from error


def _is_dataset_name(spec: str) -> bool:
    """Whether ``spec`` reads as ``name``, ``user/name`` or ``user/name:split`` rather than a path."""
    name = spec.partition(":")[0]
    return (bool(name) and name.count("/") <= 1 and not name.startswith((".", "/", "~"))
            and Path(name).suffix.lower() not in _BUILDERS)


def _load_named(spec: str, config: str | None, key: str) -> datasets.Dataset:
    """``load_dataset(name, config)`` from the local cache, one split of it."""
    import datasets

    name, _, split = spec.partition(":")
    with _quiet_datasets():
        try:
            loaded = datasets.load_dataset(name, config, split=split or None)
        except ConnectionError as error:  # offline: neither the hub nor a cached copy
            cache = datasets.config.HF_DATASETS_CACHE
            raise ConfigError(f"{key}: {spec} is no file or folder, and no dataset {name!r} is in the local "
                              f"datasets cache ({cache}); cache it once online with datasets.load_dataset"
                              f"({name!r}), or save_to_disk it and point {key} at that folder, or fix the "
                              "path.") from error
        except Exception as error:  # an unknown split or config; datasets' types vary by version
            raise ConfigError(f"{key}: {spec} could not be loaded from the datasets cache "
                              f"({_reason(error)}); fix the name, split or config.") from error
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[_pick_split(list(loaded), spec, key, named=True)]
    return loaded.with_format(None)


def _load_file(path: Path, shown: str, key: str) -> datasets.Dataset:
    import datasets

    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(f"{key}: {shown} has an unknown format ({path.suffix or 'no extension'}); "
                          f"use {_FORMATS}.")
    if path.stat().st_size == 0:  # datasets fails on an empty file with an empty StopIteration
        raise ConfigError(_no_rows(key, shown))
    # pandas would read a completion of "4" as the int 4; converters keep text columns text.
    options = {"converters": {field: str for field in TEXT_FIELDS}} if builder == "csv" else {}
    with _quiet_datasets():
        try:
            return datasets.load_dataset(builder, name=_file_version(path), data_files=str(path.resolve()),
                                         split="train", **options)
        except Exception as error:  # datasets' and pyarrow's exception types vary by version
            reason = _reason(error)
            if "corresponds to no data" in reason:  # a JSON [] or a CSV with only a header
                raise ConfigError(_no_rows(key, shown)) from error
            where = _json_problem(path) if builder == "json" else None
            if where is not None:
                raise ConfigError(f"{key}: {shown} {where}; fix that line.") from error
            raise ConfigError(f"{key}: {shown} could not be read as {_FORMAT_NAMES[builder]} ({reason}); "
                              f"fix the file, or save it as {_FORMATS}.") from error


def _json_problem(path: Path) -> str | None:
    """Where a JSON Lines file (or a JSON document) stops being JSON: ``"line 7 is not valid JSON
    (Expecting ',' delimiter at column 15)"``; ``None`` if that is not what is wrong with it.

    datasets reports a position in its read buffer, or a row count from the start of a chunk; this
    reads the file again (only when loading failed) to name the line a person can open.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if text.lstrip().startswith("["):  # one JSON document: its parser's line and column
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return f"line {err.lineno} is not valid JSON ({err.msg} at column {err.colno})"
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {number} is not valid JSON ({err.msg} at column {err.colno})"
        if not isinstance(row, dict):
            return f"line {number} is not a JSON object (it is a {type(row).__name__})"
    return None


def _load_saved(path: Path, shown: str, key: str) -> datasets.Dataset:
    import datasets

    if not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
        raise ConfigError(f"{key}: {shown} is a folder but not a saved dataset (no state.json or "
                          f"dataset_dict.json, which save_to_disk writes); point {key} at {_FORMATS}.")
    with _quiet_datasets():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as error:
            raise ConfigError(f"{key}: {shown} could not be read as a saved dataset ({_reason(error)}); "
                              "save it again with Dataset.save_to_disk.") from error
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[_pick_split(list(loaded), shown, key)]
    # A saved format (e.g. "torch") would turn labels into tensors; rows are read as Python values.
    return loaded.with_format(None)


def _pick_split(splits: list[str], shown: str, key: str, named: bool = False) -> str:
    """The split of a DatasetDict that ``key`` takes (see :func:`load_split`); ``named``: a cached
    dataset (whose split is picked with ``name:split``), else a saved folder."""
    if len(splits) == 1:
        return splits[0]
    role = key.rsplit(".", 1)[-1].partition("[")[0]  # data.train[1] -> train
    for name in _EVAL_SPLITS if role == "eval" else (role,):
        if name in splits:
            return name
    fix = f"{shown}:{splits[0]}" if named else f"one split's folder, e.g. {os.path.join(shown, splits[0])}"
    raise ConfigError(f"{key}: {shown} is a DatasetDict with splits {', '.join(splits)} and none is "
                      f"the {role} split; point {key} at {fix}.")


def _file_version(path: Path) -> str:
    """A datasets config name that changes whenever the file may have changed.

    datasets keys its cache on the file's mtime alone, so a rewrite within one clock tick, or one
    that keeps the mtime, would load the old rows; size, inode and ctime (which no tool can set
    back) catch those.
    """
    stat = path.stat()
    stamp = f"{stat.st_size}-{stat.st_mtime_ns}-{stat.st_ctime_ns}-{stat.st_ino}"
    return "deltadist-" + hashlib.sha256(stamp.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars and no logged errors (the ConfigError says it) while datasets loads."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from datasets.utils import logging as datasets_logging

    bars_were_off = are_progress_bars_disabled()
    verbosity = datasets_logging.get_verbosity()
    disable_progress_bars()
    datasets_logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logging.set_verbosity(verbosity)
        if not bars_were_off:
            enable_progress_bars()


def _reason(error: BaseException) -> str:
    """The root cause's message on one short line.

    datasets wraps the parser's error ("An error occurred while generating the dataset"), so the
    explicit ``__cause__`` chain is followed to its end; ``__context__`` (an error raised while
    handling another, e.g. datasets' fallback parser failing too) only past an empty message.
    """
    reason = type(error).__name__
    current: BaseException | None = error
    while current is not None:
        message = " ".join(str(current).split())
        reason = message or reason
        current = current.__cause__ or (None if message else current.__context__)
    return reason if len(reason) <= _REASON_CHARS else reason[:_REASON_CHARS - 3] + "..."


def _no_rows(key: str, shown: str) -> str:
    return f"{key}: {shown} holds no rows; add rows to it, or point {key} at a file that has them."
