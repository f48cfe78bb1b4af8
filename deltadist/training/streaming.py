"""``data.streaming``: the training rows of files larger than memory, read lazily as the run goes.

``data.train`` is one ``.jsonl``/``.csv``/``.parquet`` file or a glob pattern of such files (read
one after another, sorted by name), through ``datasets``' streaming readers, over and over: pass
``p`` over the files is one stretch of the stream. By default a pass is the files' rows in order;
with ``data.shuffle_buffer: n`` the files' order is shuffled and their rows go through a buffer of
``n`` rows that gives out a random one as each new row comes in (as ``datasets``'
``IterableDataset.shuffle`` does), both drawn from a generator seeded with ``training.seed`` and
``p``: a function of the seed and the pass, never of the rank or of where the run resumed.

Counting from the first row of step 1, step ``s``'s global batch is the next ``batch_size`` rows
of that stream, and global row ``g`` is rank ``g % world_size``'s: each rank parses every file but
checks, tokenizes and holds only its own rows, so one process and any number of ranks train on the
same rows a step. The position after step ``s`` is ``s * batch_size`` rows, so a resumed run
(which knows its step from the checkpoint) starts at the same row; it reads its way there again.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence, TypeVar

from deltadist.errors import ConfigError
from deltadist.training.config import TrainConfig
from deltadist.training.data_files import stream_rows, streamed_files
from deltadist.training.sources import map_columns
from deltadist.training.text_data import TokenizedExample, check_rows, tokenize_split

KEY = "data.train"
CHAT_COLUMNS = ("messages", "conversations")
RowId = tuple[str, int]
"""Where a streamed row is: its file and its number there (from 1)."""
Item = TypeVar("Item")


def streamed_examples(cfg: TrainConfig) -> int:
    """Examples a streamed run trains on (``batch_size * max_steps``: for the step plan, whose
    "epoch" is then the whole run); 0 without ``data.streaming``."""
    t = cfg.training
    return t.batch_size * t.max_steps if cfg.data.streaming and t.max_steps is not None else 0


def buffer_shuffled(items: Iterable[Item], size: int, rng: random.Random) -> Iterator[Item]:
    """``items`` in a random order drawn through a buffer of ``size``: each new item takes the
    place of a random buffered one, which is given out; the buffer's rest comes last, shuffled.
    Rows far apart in the file stay apart (a full shuffle needs ``size`` >= the rows)."""
    buffer: list[Item] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


@dataclass
class RowStream:
    """This rank's rows of the files ``spec`` names, step after step (see the module's docstring)."""

    spec: str
    """``data.train``: a file or a glob pattern of files."""
    columns: Mapping[str, str]
    """Field -> the files' column (``data.columns``)."""
    rank: int
    world_size: int
    batch_size: int
    """The global batch: rows a step over all ranks."""
    seed: int = 0
    shuffle_buffer: int = 0
    """Rows in the shuffle buffer (``data.shuffle_buffer``); 0: the files' order."""

    @classmethod
    def of_job(cls, cfg: TrainConfig, rank: int, world_size: int) -> RowStream:
        """The stream of ``cfg``'s ``data.train`` (``data.streaming``), for ``rank`` of ``world_size``."""
        return cls(cfg.data.train, cfg.data.columns, rank, world_size, cfg.training.batch_size,
                   cfg.training.seed, cfg.data.shuffle_buffer)

    def files(self) -> list[str]:
        """The files the stream reads, in their order (a pattern's as it matches now)."""
        return streamed_files(self.spec, KEY)

    def rows(self) -> Iterator[tuple[RowId, dict[str, Any]]]:
        """``((file, row number there), row)`` of pass 0, 1, ... over the files, endlessly."""
        files = self.files()
        for index in itertools.count():
            rows = self._pass(files, index)
            if self.shuffle_buffer:
                rows = buffer_shuffled(rows, self.shuffle_buffer, self._rng(index, "rows"))
            yield from rows

    def _rng(self, index: int, draws: str) -> random.Random:
        """Pass ``index``'s generator for ``draws``: a function of the seed and the pass alone."""
        return random.Random(f"deltadist-stream-{self.seed}-{index}-{draws}")

    def _pass(self, files: list[str], index: int) -> Iterator[tuple[RowId, dict[str, Any]]]:
        if self.shuffle_buffer:
            files = list(files)
            self._rng(index, "files").shuffle(files)
        count = 0
        for file in files:
            for number, row in enumerate(stream_rows(file, KEY), 1):
                count += 1
                yield (file, number), row
        if count == 0:
            raise ConfigError(f"{KEY}: {self.spec} holds no rows; add rows to it, or point {KEY} at a "
                              "file that has them.")

    def batches_after(self, done: int) -> Iterator[tuple[list[dict[str, Any]], list[RowId]]]:
        """This rank's rows of the global batches of steps ``done + 1, ...``, with where each is,
        one step at a time (endless: the job stops at ``training.max_steps``)."""
        per_rank = self.batch_size // self.world_size
        rows: list[dict[str, Any]] = []
        ids: list[RowId] = []
        for index, (row_id, row) in enumerate(itertools.islice(self.rows(), done * self.batch_size, None)):
            if index % self.world_size != self.rank:
                continue
            rows.append(row)
            ids.append(row_id)
            if len(rows) == per_rank:
                yield rows, ids
                rows, ids = [], []

    def examples_after(self, done: int, total: int, task: str, tokenizer: Any, max_length: int,
                       labels: Sequence[str] | None) -> Iterator[list[TokenizedExample]]:
        """This rank's examples of steps ``done + 1 ... total``, checked (errors name their rows in
        their files) and tokenized for ``task`` one step at a time."""
        for rows, ids in itertools.islice(self.batches_after(done), max(total - done, 0)):
            dataset, shown = self._checked(rows, ids, task, labels)
            yield tokenize_split(dataset, task, tokenizer, max_length, labels, shown, KEY)

    def check_first(self, task: str, labels: Sequence[str] | None) -> None:
        """Check this rank's rows of the first step, before the model's weights load.

        Raises:
            ConfigError: a file is missing, unreadable or empty, or those rows are wrong.
        """
        rows, ids = next(self.batches_after(0))
        self._checked(rows, ids, task, labels)

    def _checked(self, rows: list[dict[str, Any]], ids: Sequence[RowId], task: str,
                 labels: Sequence[str] | None) -> tuple[Any, str]:
        """The rows as one dataset with the fields' names, and how errors name them; each file's
        rows are checked on their own, so an error names the file and the row there."""
        import datasets

        files = list(dict.fromkeys(file for file, _ in ids))
        for file in files:
            own = [index for index, (where, _) in enumerate(ids) if where == file]
            dataset, shown = map_columns(datasets.Dataset.from_list([rows[i] for i in own]), self.columns,
                                         file, KEY)
            chat = [c for c in CHAT_COLUMNS if c in dataset.column_names]
            if chat:
                raise ConfigError(f"{KEY}: {file} holds chat rows ('{chat[0]}' column), which are not "
                                  "streamed; set data.streaming: false (chat rows are read whole).")
            check_rows(dataset, task, labels, shown, KEY, [ids[i][1] for i in own])
        if len(files) == 1:
            return dataset, shown
        return map_columns(datasets.Dataset.from_list(rows), self.columns, self.spec, KEY)
