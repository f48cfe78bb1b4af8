"""The job's data: the rows of ``data.train`` / ``data.eval`` (or the built-in topic set), their
class names, and their tokenized examples -- all checked before any training starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deltadist.errors import ConfigError
from deltadist.training.chat_data import chat_fields, chat_rows, read_template, tokenize_chat
from deltadist.training.config import TrainConfig
from deltadist.training.data_files import load_split
from deltadist.training.packing import pack
from deltadist.training.text_data import TokenizedExample, check_rows, label_names, tokenize_split


@dataclass
class Rows:
    """The data sets (``datasets.Dataset``) and where they came from."""

    train: Any
    eval: Any | None
    train_path: str
    eval_path: str | None
    labels: list[str] | None
    """Class names (``sequence_classification`` only)."""
    chat: dict[str, Any] = field(default_factory=dict)
    """Per split key (``data.train``): its conversations, for chat rows (see :mod:`chat_data`)."""
    chat_template: str | None = None
    """``data.chat_template``'s Jinja text; ``None``: the tokenizer's."""


@dataclass
class JobData:
    """Tokenized examples."""

    train: list[TokenizedExample]
    eval: list[TokenizedExample] | None
    labels: list[str] | None


def load_rows(cfg: TrainConfig) -> Rows:
    """Read the rows (``datasets``), settle the class names and check every row's fields (no
    tokenizer needed: the job does this before the model's weights load).

    Raises:
        ConfigError: a file is missing, unreadable, empty, or its rows lack the task's fields.
    """
    rows = _read_rows(cfg)
    rows.chat_template = read_template(cfg.data.chat_template)
    _check(rows, rows.train, rows.train_path, "data.train", cfg)
    if rows.eval is not None:
        _check(rows, rows.eval, rows.eval_path, "data.eval", cfg)
    if not rows.chat and (cfg.data.chat_template is not None or cfg.data.messages_field is not None):
        raise ConfigError(f"data.{'chat_template' if cfg.data.chat_template else 'messages_field'} applies "
                          "to chat rows (messages or conversations), but the data has none; set it to null "
                          "or give chat rows.")
    return rows


def _check(rows: Rows, dataset: Any, path: Any, key: str, cfg: TrainConfig) -> None:
    """Check one split's rows: chat rows (kept in ``rows.chat``; causal_lm) or the task's fields."""
    found = () if cfg.data.builtin else chat_fields(dataset, cfg.data.messages_field, path, key)
    if cfg.task == "causal_lm" and found:
        rows.chat[key] = chat_rows(dataset, found, path, key)
        return
    try:
        check_rows(dataset, cfg.task, rows.labels, path, key)
    except ConfigError as error:
        if not found:
            raise
        raise ConfigError(f"{key}: {path} holds chat rows ('{found[0]}' column), which task causal_lm "
                          f"trains; set task: causal_lm, or give {cfg.task} rows.") from error


def _read_rows(cfg: TrainConfig) -> Rows:
    """The rows of both splits and the class names, as read."""
    import datasets

    data = cfg.data
    if data.builtin:
        from deltadist.training.data import LABELS, load_topics

        train_set, test_set = load_topics(data.train_size, data.test_size, data.seed)
        train, evaluation = (
            datasets.Dataset.from_list([{"text": e.text, "label": LABELS[e.label]} for e in part])
            for part in (train_set, test_set))
        eval_path: str | None = f"{data.train} (test split)"
        if data.eval is not None:
            evaluation, eval_path = load_split(data.eval, "data.eval"), data.eval
        return Rows(train, evaluation, data.train, eval_path, list(data.labels or LABELS))
    train = load_split(data.train, "data.train")
    evaluation = load_split(data.eval, "data.eval") if data.eval is not None else None
    labels = None
    if cfg.task == "sequence_classification":
        labels = label_names(train, data.train, data.labels)
    return Rows(train, evaluation, data.train, data.eval, labels)


def tokenize(rows: Rows, cfg: TrainConfig, tokenizer: Any) -> JobData:
    """Tokenize both splits for ``cfg.task`` (packing the training rows when asked)."""
    max_length = cfg.model.max_length

    def split(dataset: Any, path: Any, key: str) -> list[TokenizedExample]:
        if key in rows.chat:
            return tokenize_chat(rows.chat[key], tokenizer, rows.chat_template, max_length, path, key)
        return tokenize_split(dataset, cfg.task, tokenizer, max_length, rows.labels, path, key)

    train = split(rows.train, rows.train_path, "data.train")
    if cfg.data.packing:
        train = pack(train, max_length)
    evaluation = None if rows.eval is None else split(rows.eval, rows.eval_path, "data.eval")
    return JobData(train, evaluation, rows.labels)
