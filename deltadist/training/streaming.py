"""``data.streaming``: the training rows of a file larger than memory, read lazily as the run goes.

The file is read as an endless repetition of itself, in its own order (no shuffle: shuffle the
file beforehand), through ``datasets``' streaming readers. Counting from the first row of step 1,
step ``s``'s global batch is the next ``batch_size`` rows, ``(s-1)*batch_size ...``, and global row
``g`` is rank ``g % world_size``'s: each rank parses the file but checks, tokenizes and holds only
its own rows, and one process and any number of ranks train on the same rows a step. The position
after step ``s`` is ``s * batch_size`` rows, so a resumed run (which knows its step from the
checkpoint) starts at the same row; it reads its way there again.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from deltadist.errors import ConfigError
from deltadist.training.config import TrainConfig
from deltadist.training.data_files import stream_rows
from deltadist.training.sources import map_columns
from deltadist.training.text_data import TokenizedExample, check_rows, tokenize_split

KEY = "data.train"
CHAT_COLUMNS = ("messages", "conversations")


def streamed_examples(cfg: TrainConfig) -> int:
    """Examples a streamed run trains on (``batch_size * max_steps``: for the step plan, whose
    "epoch" is then the whole run); 0 without ``data.streaming``."""
    t = cfg.training
    return t.batch_size * t.max_steps if cfg.data.streaming and t.max_steps is not None else 0


@dataclass
class RowStream:
    """This rank's rows of ``path``, step after step (see the module's docstring)."""

    path: str
    columns: Mapping[str, str]
    """Field -> the file's column (``data.columns``)."""
    rank: int
    world_size: int
    batch_size: int
    """The global batch: rows a step over all ranks."""

    def rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(row number in the file, row)`` of the file repeated end to end."""
        while True:
            count = 0
            for count, row in enumerate(stream_rows(self.path, KEY), 1):
                yield count, row
            if count == 0:
                raise ConfigError(f"{KEY}: {self.path} holds no rows; add rows to it, or point {KEY} at a "
                                  "file that has them.")

    def batches_after(self, done: int) -> Iterator[tuple[list[dict[str, Any]], list[int]]]:
        """This rank's rows of the global batches of steps ``done + 1, ...``, with their numbers in
        the file, one step at a time (endless: the job stops at ``training.max_steps``)."""
        per_rank = self.batch_size // self.world_size
        rows: list[dict[str, Any]] = []
        numbers: list[int] = []
        for index, (number, row) in enumerate(itertools.islice(self.rows(), done * self.batch_size, None)):
            if index % self.world_size != self.rank:
                continue
            rows.append(row)
            numbers.append(number)
            if len(rows) == per_rank:
                yield rows, numbers
                rows, numbers = [], []

    def examples_after(self, done: int, total: int, task: str, tokenizer: Any, max_length: int,
                       labels: Sequence[str] | None) -> Iterator[list[TokenizedExample]]:
        """This rank's examples of steps ``done + 1 ... total``, checked (errors name their rows in the
        file) and tokenized for ``task`` one step at a time."""
        for rows, numbers in itertools.islice(self.batches_after(done), max(total - done, 0)):
            dataset, shown = self._checked(rows, numbers, task, labels)
            yield tokenize_split(dataset, task, tokenizer, max_length, labels, shown, KEY)

    def check_first(self, task: str, labels: Sequence[str] | None) -> None:
        """Check this rank's rows of the first step, before the model's weights load.

        Raises:
            ConfigError: the file is missing, unreadable or empty, or those rows are wrong.
        """
        rows, numbers = next(self.batches_after(0))
        self._checked(rows, numbers, task, labels)

    def _checked(self, rows: list[dict[str, Any]], numbers: Sequence[int], task: str,
                 labels: Sequence[str] | None) -> tuple[Any, str]:
        import datasets

        dataset, shown = map_columns(datasets.Dataset.from_list(rows), self.columns, self.path, KEY)
        chat = [c for c in CHAT_COLUMNS if c in dataset.column_names]
        if chat:
            raise ConfigError(f"{KEY}: {self.path} holds chat rows ('{chat[0]}' column), which are not "
                              "streamed; set data.streaming: false (chat rows are read whole).")
        check_rows(dataset, task, labels, shown, KEY, numbers)
        return dataset, shown
