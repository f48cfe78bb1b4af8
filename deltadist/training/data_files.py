"""Reading a split of the user's data for ``deltadist train`` (``data.train``, ``data.eval``) into a
``datasets.Dataset``, with every problem a one-line :class:`ConfigError`.

A split is a ``.jsonl``/``.json``/``.csv``/``.parquet`` file or a folder written by
``save_to_disk``. What the rows must hold, and turning them into token ids, is
:mod:`deltadist.training.text_data`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from deltadist.errors import ConfigError
from deltadist.training.text_data import TEXT_FIELDS

if TYPE_CHECKING:
    import datasets

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_FORMAT_NAMES = {"json": "JSON Lines or a JSON array of objects", "csv": "CSV with a header row",
                 "parquet": "Parquet"}
_FORMATS = "a .jsonl, .json, .csv or .parquet file, or a folder written by Dataset.save_to_disk"
_EVAL_SPLITS = ("eval", "validation", "valid", "dev", "test")
"""Splits of a saved DatasetDict that ``data.eval`` takes, in this order of preference."""
_REASON_CHARS = 200


def load_split(path: str | os.PathLike, key: str) -> datasets.Dataset:
    """The rows of the file or saved-dataset folder at ``path``, via ``datasets``.

    ``.jsonl``/``.json`` load with the ``json`` builder, ``.csv`` with ``csv`` (prompt, completion and
    text columns read as strings, so ``4`` stays the text ``"4"``), ``.parquet`` with ``parquet``; a
    folder with ``load_from_disk``. A saved ``DatasetDict`` gives its only split, else the split
    named like the key's last part (``data.train`` -> ``train``; ``data.eval`` -> the first of
    ``eval, validation, valid, dev, test``). ``key`` names the split in errors (``"data.train"``).
    """
    shown = os.fspath(path)
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{key}: {shown} does not exist; check the path (relative paths are from "
                          "the directory you run deltadist train in).")
    dataset = _load_saved(path, shown, key) if path.is_dir() else _load_file(path, shown, key)
    if dataset.num_rows == 0:
        raise ConfigError(_no_rows(key, shown))
    return dataset


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


def _pick_split(splits: list[str], shown: str, key: str) -> str:
    """The split of a saved DatasetDict that ``key`` takes (see :func:`load_split`)."""
    if len(splits) == 1:
        return splits[0]
    role = key.rsplit(".", 1)[-1]
    for name in _EVAL_SPLITS if role == "eval" else (role,):
        if name in splits:
            return name
    raise ConfigError(f"{key}: {shown} is a DatasetDict with splits {', '.join(splits)} and none is "
                      f"the {role} split; point {key} at one split's folder, e.g. "
                      f"{os.path.join(shown, splits[0])}.")


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
