"""The user's rows for ``deltadist train`` as token ids: check every row, then tokenize per task.

Rows are ``{"prompt", "completion"}`` or ``{"text"}`` for ``causal_lm`` and ``seq2seq``,
``{"text", "label"}`` for ``sequence_classification`` (read from files by
:mod:`deltadist.training.data_files`); ``causal_lm``'s chat rows are
:mod:`deltadist.training.chat_data`'s. Every problem with the data is a one-line
:class:`ConfigError` naming the config key, the file, the row (1-based data rows: the line number
of a JSON Lines file without blank lines; a CSV header is not a row) and the fix, raised before
any tokenizing.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from deltadist.errors import ConfigError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

TASKS: tuple[str, ...] = ("causal_lm", "seq2seq", "sequence_classification")
IGNORE_INDEX = -100
"""Label of a token that adds no loss (the prompt of a ``causal_lm`` row); torch's cross-entropy default."""
TEXT_FIELDS = ("prompt", "completion", "text")
"""The columns of a row that hold text (``causal_lm`` / ``seq2seq`` fields; ``text`` in every task)."""


@dataclass(frozen=True)
class TokenizedExample:
    """One example as token ids."""

    input_ids: tuple[int, ...]
    """causal_lm: prompt + completion (+ eos); seq2seq: the source (the empty source for text rows);
    sequence_classification: the text."""
    labels: tuple[int, ...]
    """causal_lm: as long as ``input_ids``, :data:`IGNORE_INDEX` on prompt tokens; seq2seq: the target
    ids (with the eos the tokenizer adds); sequence_classification: ``(class index,)``."""
    segments: tuple[int, ...] = ()
    """A packed causal_lm row (:mod:`deltadist.training.packing`): the lengths of the whole examples
    it holds, in order; ``()``: one example, not packed."""



def label_names(dataset: datasets.Dataset, path: str | os.PathLike,
                configured: Sequence[str] | None = None) -> list[str]:
    """The class names of a sequence_classification split, index ``i`` naming class ``i``.

    ``configured`` if given (every label must then be one of the names or an int index below
    ``len(configured)``); else sorted unique names for string labels, ``["0", ..., str(max)]`` for
    int labels. Bools and floats are not labels.
    """
    values = _column(dataset, "label", path, None, "sequence_classification rows need text and label.")
    if configured is not None:
        names = [str(name) for name in configured]
        lookup = {name: i for i, name in enumerate(names)}
        for row, value in enumerate(values, 1):
            _label_index(value, lookup, _where(None, path, row), "the configured labels")
        return names
    kinds = set()
    for row, value in enumerate(values, 1):
        _check_label_kind(value, _where(None, path, row))
        kinds.add(type(value))
        if len(kinds) > 1:
            raise ConfigError(f"{_where(None, path, row)}: label {value!r} mixes class names and "
                              "int indices with earlier rows; use one kind in every row.")
    if str in kinds:
        return sorted(set(values))
    return [str(i) for i in range(max(values) + 1)]


def tokenize_split(dataset: datasets.Dataset, task: str, tokenizer: PreTrainedTokenizerBase,
                   max_length: int, labels: Sequence[str] | None, path: str | os.PathLike,
                   key: str) -> list[TokenizedExample]:
    """One :class:`TokenizedExample` per row, in row order; every row is checked before any tokenizing.

    ``labels`` are the class names (sequence_classification only, see :func:`label_names`).
    Sequences are cut to ``max_length`` tokens, keeping their start. A causal_lm row whose
    completion is cut off entirely is kept (it adds no loss) and counted in a warning; if every
    prompt/completion row is cut so, that is an error.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}.")
    if task == "sequence_classification":
        if labels is None:
            raise ValueError("sequence_classification needs the class names (see label_names).")
        return _classification(dataset, tokenizer, max_length, labels, path, key)
    rows = _text_rows(dataset, task, path, key)
    if task == "causal_lm":
        return _causal_lm(rows, tokenizer, max_length, path, key)
    return _seq2seq(rows, tokenizer, max_length, path, key)


def check_rows(dataset: datasets.Dataset, task: str, labels: Sequence[str] | None,
               path: str | os.PathLike, key: str, numbers: Sequence[int] | None = None) -> None:
    """Check that every row has the task's fields (and a known label), as :func:`tokenize_split`
    will, but without a tokenizer: the job calls it before the model's weights load. ``numbers``:
    the rows' numbers in the file (streamed rows), else 1, 2, ...

    Raises:
        ConfigError: the first row that is wrong, named by its number.
    """
    if task == "sequence_classification":
        if labels is None:
            raise ValueError("sequence_classification needs the class names (see label_names).")
        _classes(dataset, labels, path, key, numbers)
    else:
        _text_rows(dataset, task, path, key, numbers)


# --- checking rows -------------------------------------------------------------------------------

def _where(key: str | None, path: str | os.PathLike, row: int | None = None) -> str:
    """The start of an error message: ``"data.train: x.jsonl row 7"``."""
    where = os.fspath(path) if key is None else f"{key}: {os.fspath(path)}"
    return where if row is None else f"{where} row {row}"


def _column(dataset: datasets.Dataset, name: str, path: str | os.PathLike, key: str | None,
            needs: str) -> list[Any]:
    """The values of column ``name``; an error listing the columns there are if it is missing."""
    if name not in dataset.column_names:
        raise ConfigError(f"{_where(key, path)} has no '{name}' column (it has: "
                          f"{', '.join(dataset.column_names)}); {needs}")
    # datasets >= 4 returns a lazy Column, which [:] reads in one go (iterating it is slow).
    return dataset[name][:]


def _fields_of(dataset: datasets.Dataset, index: int) -> str:
    """The fields row ``index`` has a value for, for error messages."""
    return ", ".join(name for name, value in dataset[index].items() if value is not None) or "nothing"


def _check_text(value: Any, field: str, where: str) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: '{field}' must be a string, got {type(value).__name__} {value!r}; "
                          "write it as a quoted string.")
    if not value.strip():
        raise ConfigError(f"{where}: '{field}' is empty; give it text or remove the row.")


def _text_rows(dataset: datasets.Dataset, task: str, path: str | os.PathLike,
               key: str, numbers: Sequence[int] | None = None) -> list[tuple[str | None, str]]:
    """Each causal_lm/seq2seq row as ``(prompt, completion)``, or ``(None, text)`` for a text row."""
    needs = f"{task} rows need prompt and completion, or text."
    present = [field for field in TEXT_FIELDS if field in dataset.column_names]
    if "text" not in present and len(present) < 2:
        other = {"prompt": "completion", "completion": "prompt"}
        what = (f"no '{other[present[0]]}' column (nor 'text')" if present
                else "no prompt/completion or text columns")
        chat = " (or chat rows: messages or conversations)" if task == "causal_lm" else ""
        raise ConfigError(f"{_where(key, path)} has {what} (it has: {', '.join(dataset.column_names)}); "
                          f"{needs.removesuffix('.')}{chat}.")
    n = dataset.num_rows
    prompts, completions, texts = (dataset[f][:] if f in present else [None] * n for f in TEXT_FIELDS)
    rows: list[tuple[str | None, str]] = []
    for index, (prompt, completion, text) in enumerate(zip(prompts, completions, texts)):
        where = _where(key, path, numbers[index] if numbers else index + 1)
        if text is not None and (prompt is not None or completion is not None):
            raise ConfigError(f"{where} has both text and prompt/completion; give each row either "
                              "prompt and completion, or text.")
        if text is not None:
            _check_text(text, "text", where)
            rows.append((None, text))
            continue
        if prompt is None or completion is None:
            missing = ("prompt/completion or 'text'" if prompt is None and completion is None
                       else "'prompt'" if prompt is None else "'completion'")
            raise ConfigError(f"{where}: no {missing} field (it has: {_fields_of(dataset, index)}); {needs}")
        _check_text(prompt, "prompt", where)
        _check_text(completion, "completion", where)
        rows.append((prompt, completion))
    return rows


def _check_label_kind(value: Any, where: str) -> None:
    """Raise unless ``value`` is a class name (a string) or a class index (an int >= 0)."""
    if value is None:
        raise ConfigError(f"{where}: no 'label'; give every row a label (a class name or an int index).")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"{where}: label {value!r} is a {type(value).__name__}; labels are class "
                          "names (strings) or class indices (ints from 0).")
    if isinstance(value, int) and value < 0:
        raise ConfigError(f"{where}: label {value} is negative; class indices count from 0.")


def _label_index(value: Any, lookup: dict[str, int], where: str, source: str) -> int:
    """The class index of label ``value`` among the names in ``lookup`` (from ``source``)."""
    _check_label_kind(value, where)
    if isinstance(value, int):
        if value >= len(lookup):
            raise ConfigError(f"{where}: label {value} is out of range: {source} name {len(lookup)} "
                              f"classes (indices 0-{len(lookup) - 1}); fix the row.")
        return value
    if value not in lookup:
        raise ConfigError(f"{where}: label {value!r} is not a known class (known: {', '.join(lookup)}, "
                          f"from {source}); fix the row or add the class to {source}.")
    return lookup[value]


# --- tokenizing ----------------------------------------------------------------------------------

def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], target: bool = False,
            **options: Any) -> list[list[int]]:
    """Token ids of each text (as seq2seq targets if ``target``), in one batched call, not one per row."""
    if not texts:
        return []
    encoded = tokenizer(**{"text_target" if target else "text": texts}, return_attention_mask=False,
                        return_token_type_ids=False, **options)
    return encoded["input_ids"]


def _causal_lm(rows: list[tuple[str | None, str]], tokenizer: PreTrainedTokenizerBase, max_length: int,
               path: str | os.PathLike, key: str) -> list[TokenizedExample]:
    eos = tokenizer.eos_token_id
    pairs = [i for i, (prompt, _) in enumerate(rows) if prompt is not None]
    singles = [i for i, (prompt, _) in enumerate(rows) if prompt is None]
    # verbose=False: sequences longer than the model's limit are cut below, not by the tokenizer.
    prompt_ids = _encode(tokenizer, [rows[i][0] for i in pairs], verbose=False)
    completion_ids = _encode(tokenizer, [rows[i][1] for i in pairs], add_special_tokens=False, verbose=False)
    text_ids = _encode(tokenizer, [rows[i][1] for i in singles], verbose=False)

    def with_eos(ids: list[int]) -> list[int]:
        # A tokenizer that already ends texts with eos (e.g. add_eos_token=True) must not get two.
        return ids + [eos] if eos is not None and ids[-1:] != [eos] else ids

    by_row: dict[int, TokenizedExample] = {}
    lost = 0
    for i, prompt, completion in zip(pairs, prompt_ids, completion_ids):
        ids = with_eos(prompt + completion)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + ids[len(prompt):])[:max_length]
        lost += len(prompt) >= max_length
        by_row[i] = TokenizedExample(tuple(ids), tuple(labels))
    for i, text in zip(singles, text_ids):
        ids = tuple(with_eos(text)[:max_length])
        by_row[i] = TokenizedExample(ids, ids)
    if pairs and lost == len(pairs):
        raise ConfigError(f"{key}: every prompt of {os.fspath(path)} fills model.max_length ({max_length} "
                          f"tokens; the longest prompt has {max(map(len, prompt_ids))}), so no "
                          "completion token is left to learn; raise model.max_length or shorten the prompts.")
    if lost:
        warnings.warn(f"{key}: in {lost} of {len(pairs)} prompt/completion rows of {os.fspath(path)} the "
                      f"prompt fills model.max_length ({max_length} tokens), so they add no loss; raise "
                      "model.max_length to learn from them.", stacklevel=3)
    return [by_row[i] for i in range(len(rows))]


def _seq2seq(rows: list[tuple[str | None, str]], tokenizer: PreTrainedTokenizerBase, max_length: int,
             path: str | os.PathLike, key: str) -> list[TokenizedExample]:
    # A text row is a target with nothing to condition on: its source is the encoding of "".
    empty = tuple(_encode(tokenizer, [""])[0])
    text_row = next((i for i, (prompt, _) in enumerate(rows, 1) if prompt is None), None)
    if not empty and text_row is not None:
        raise ConfigError(f"{_where(key, path, text_row)} is a text row, but the tokenizer encodes an empty "
                          "source as no tokens at all; give seq2seq rows a prompt and completion.")
    cut = {"truncation": True, "max_length": max_length}
    sources = _encode(tokenizer, [prompt for prompt, _ in rows if prompt is not None], **cut)
    targets = _encode(tokenizer, [target for _, target in rows], target=True, **cut)
    source_of = iter(sources)
    return [TokenizedExample(tuple(next(source_of)) if prompt is not None else empty, tuple(target))
            for (prompt, _), target in zip(rows, targets)]


def _classification(dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int,
                    labels: Sequence[str], path: str | os.PathLike, key: str) -> list[TokenizedExample]:
    texts, classes = _classes(dataset, labels, path, key)
    ids = _encode(tokenizer, texts, truncation=True, max_length=max_length)
    return [TokenizedExample(tuple(i), (c,)) for i, c in zip(ids, classes)]


def _classes(dataset: datasets.Dataset, labels: Sequence[str], path: str | os.PathLike,
             key: str, numbers: Sequence[int] | None = None) -> tuple[list[str], list[int]]:
    """The texts of a sequence_classification split and their class indices, every row checked."""
    needs = "sequence_classification rows need text and label."
    texts = _column(dataset, "text", path, key, needs)
    values = _column(dataset, "label", path, key, needs)
    lookup = {str(name): i for i, name in enumerate(labels)}
    source = "the configured labels or those of data.train"
    classes = []
    for index, (text, value) in enumerate(zip(texts, values)):
        where = _where(key, path, numbers[index] if numbers else index + 1)
        if text is None:
            raise ConfigError(f"{where}: no 'text' field (it has: {_fields_of(dataset, index)}); {needs}")
        _check_text(text, "text", where)
        classes.append(_label_index(value, lookup, where, source))
    return texts, classes
