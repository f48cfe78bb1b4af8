"""The job's data: the rows of ``data.train`` / ``data.eval``'s sources (or the built-in topic set),
their class names, and their tokenized examples -- all checked before any training starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deltadist.errors import ConfigError
from deltadist.training.chat_data import chat_fields, chat_rows, read_template, tokenize_chat
from deltadist.training.config import TrainConfig
from deltadist.training.data_files import load_split
from deltadist.training.packing import pack
from deltadist.training.sources import Mixture, Source, map_columns, parse_sources
from deltadist.training.text_data import TokenizedExample, check_rows, label_names, tokenize_split


@dataclass
class Part:
    """One source of a split, as read (and its columns mapped)."""

    source: Source
    dataset: Any
    """A ``datasets.Dataset``."""
    shown: str
    """How errors name it: the path, and its column mapping."""
    key: str
    """How errors name its config key: ``data.train``, or ``data.train[1]`` among several sources."""
    chat: Any | None = None
    """Its conversations, for chat rows (see :mod:`chat_data`); ``None``: prompt/completion/text rows."""


@dataclass
class Rows:
    """The sources of both splits, read."""

    train: list[Part]
    eval: list[Part] | None
    labels: list[str] | None
    """Class names (``sequence_classification`` only)."""
    chat_template: str | None = None
    """``data.chat_template``'s Jinja text; ``None``: the tokenizer's."""

    def counts(self) -> tuple[int, int | None]:
        """Training and evaluation rows, over all sources."""
        return (sum(p.dataset.num_rows for p in self.train),
                None if self.eval is None else sum(p.dataset.num_rows for p in self.eval))


@dataclass
class JobData:
    """Tokenized examples (several training sources' one source after another)."""

    train: list[TokenizedExample]
    eval: list[TokenizedExample] | None
    labels: list[str] | None
    mixture: Mixture | None = None
    """How an epoch mixes several training sources; ``None``: one source, every example once."""


def load_rows(cfg: TrainConfig) -> Rows:
    """Read the rows (``datasets``), settle the class names and check every row's fields (no
    tokenizer needed: the job does this before the model's weights load).

    Raises:
        ConfigError: a source is missing, unreadable, empty, or its rows lack the task's fields.
    """
    rows = _read_rows(cfg)
    rows.chat_template = read_template(cfg.data.chat_template)
    for part in rows.train + (rows.eval or []):
        _check(rows, part, cfg)
    chat = any(part.chat is not None for part in rows.train + (rows.eval or []))
    if not chat and (cfg.data.chat_template is not None or cfg.data.messages_field is not None):
        raise ConfigError(f"data.{'chat_template' if cfg.data.chat_template else 'messages_field'} applies "
                          "to chat rows (messages or conversations), but the data has none; set it to null "
                          "or give chat rows.")
    return rows


def _check(rows: Rows, part: Part, cfg: TrainConfig) -> None:
    """Check one source's rows: chat rows (kept in ``part.chat``; causal_lm) or the task's fields."""
    dataset, shown, key = part.dataset, part.shown, part.key
    found = () if cfg.data.builtin else chat_fields(dataset, cfg.data.messages_field, shown, key)
    if cfg.task == "causal_lm" and found:
        part.chat = chat_rows(dataset, found, shown, key)
        return
    try:
        check_rows(dataset, cfg.task, rows.labels, shown, key)
    except ConfigError as error:
        if not found:
            raise
        raise ConfigError(f"{key}: {shown} holds chat rows ('{found[0]}' column), which task causal_lm "
                          f"trains; set task: causal_lm, or give {cfg.task} rows.") from error


def _read_rows(cfg: TrainConfig) -> Rows:
    """The sources of both splits and the class names, as read."""
    import datasets

    data = cfg.data
    evaluation = None if data.eval is None else _read(data.eval, data.columns, "data.eval")
    if data.builtin:
        from deltadist.training.data import LABELS, load_topics

        train_set, test_set = load_topics(data.train_size, data.test_size, data.seed)
        train, test = (Part(Source(data.train), datasets.Dataset.from_list(
            [{"text": e.text, "label": LABELS[e.label]} for e in part]), shown, key)
            for part, shown, key in ((train_set, data.train, "data.train"),
                                     (test_set, f"{data.train} (test split)", "data.eval")))
        return Rows([train], evaluation or [test], list(data.labels or LABELS))
    if data.streaming:  # read by the job as it trains (training/streaming.py)
        return Rows([], evaluation, None if data.labels is None else list(data.labels))
    train = _read(data.train, data.columns, "data.train")
    labels = None
    if cfg.task == "sequence_classification":
        labels = _label_names(train, data.labels)
    return Rows(train, evaluation, labels)


def _read(value: Any, columns: dict[str, str], key: str) -> list[Part]:
    """Each source of ``value`` (``data.train`` or ``data.eval``) read, its columns mapped."""
    sources = parse_sources(value, columns, key)
    parts = []
    for index, source in enumerate(sources):
        where = key if isinstance(value, str) else f"{key}[{index}]"
        dataset = load_split(source.path, where, source.config)
        dataset, shown = map_columns(dataset, source.columns, source.path, where)
        parts.append(Part(source, dataset, shown, where))
    return parts


def _label_names(parts: list[Part], configured: list[str] | None) -> list[str]:
    """The class names over every training source (see :func:`label_names`)."""
    per_source = [label_names(p.dataset, p.shown, configured) for p in parts]
    if configured is not None or len(per_source) == 1:
        return per_source[0]
    names = [n for names in per_source for n in names]
    indices = [names for p, names in zip(parts, per_source) if not _named_classes(p.dataset)]
    if indices and len(indices) < len(parts):
        raise ConfigError("data.train: some sources label rows with class names, others with int indices; "
                          "use one kind in every source (or set data.labels).")
    return [str(i) for i in range(max(len(n) for n in indices))] if indices else sorted(set(names))


def _named_classes(dataset: Any) -> bool:
    """Whether a source's labels are class names (strings), not indices."""
    return isinstance(dataset[0]["label"], str)


def tokenize(rows: Rows, cfg: TrainConfig, tokenizer: Any) -> JobData:
    """Tokenize both splits for ``cfg.task`` (packing each training source's rows when asked)."""
    max_length = cfg.model.max_length

    def source(part: Part) -> list[TokenizedExample]:
        if part.chat is not None:
            return tokenize_chat(part.chat, tokenizer, rows.chat_template, max_length, part.shown, part.key)
        return tokenize_split(part.dataset, cfg.task, tokenizer, max_length, rows.labels, part.shown,
                              part.key)

    train = [source(part) for part in rows.train]
    if cfg.data.packing:
        train = [pack(examples, max_length) for examples in train]
    sizes = [len(examples) for examples in train]
    mixture = Mixture(tuple(sizes), tuple(p.source.weight for p in rows.train)) if len(train) > 1 else None
    evaluation = None if rows.eval is None else [e for part in rows.eval for e in source(part)]
    return JobData([e for examples in train for e in examples], evaluation, rows.labels, mixture)
