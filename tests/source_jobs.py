"""``deltadist train`` jobs whose training rows come from several sources, or are streamed, for
``tests/e2e/test_train_sources.py`` and ``tests/distributed/test_train_mixed_streamed.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import yaml

from tests.task_jobs import Job, make_job
from tests.text_tasks import cache_dataset, write_jsonl


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def renamed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """prompt/completion rows under the user's names: question/answer."""
    return [{"question": r["prompt"], "answer": r["completion"]} for r in rows]


def with_data(job: Job, data: dict[str, Any]) -> Job:
    """``job`` with its config's ``data`` section replaced by ``data``."""
    config = job.config_dict()
    config["data"] = data
    job.config.write_text(yaml.safe_dump(config, sort_keys=False))
    return job


def mixed_job(root: Path, cache: Path | None = None, **training: Any) -> Job:
    """A causal_lm job (:func:`make_job`'s 64 training rows) on three sources: 40 rows as JSON Lines
    under other column names (weight 1), 16 in a save_to_disk folder (weight 2) and 8 more (weight
    1) as JSON Lines, or with ``cache`` the cached dataset ``user/tail`` in the datasets cache
    there. An epoch of 64 draws 16 of the first (a fresh subset each epoch), 32 of the second
    (each row twice) and 16 of the third (each row twice)."""
    job = make_job(root, "causal_lm", **training)
    rows = read_rows(job.train)
    write_jsonl(root / "renamed.jsonl", renamed(rows[:40]))
    datasets.Dataset.from_list(rows[40:56]).save_to_disk(root / "saved")
    tail = "user/tail" if cache is not None else str(root / "tail.jsonl")
    if cache is not None:
        cache_dataset(cache, tail, {"train": rows[56:]})
    else:
        write_jsonl(tail, rows[56:])
    return with_data(job, {"train": [
        {"path": str(root / "renamed.jsonl"), "columns": {"prompt": "question", "completion": "answer"}},
        {"path": str(root / "saved"), "weight": 2},
        tail,
    ], "eval": str(job.eval)})


def streamed_job(root: Path, shards: int = 1, shuffle_buffer: int = 0, **training: Any) -> Job:
    """A causal_lm job reading its 64 training rows with ``data.streaming`` (rows and evaluation rows
    under other column names): from ``renamed.jsonl``, or with ``shards`` > 1 from the pattern
    ``renamed-*.jsonl`` of that many files (of uneven sizes); ``shuffle_buffer``:
    ``data.shuffle_buffer``. ``training`` must give ``max_steps``."""
    job = make_job(root, "causal_lm", **training)
    rows = renamed(read_rows(job.train))
    train = str(root / "renamed.jsonl")
    if shards == 1:
        write_jsonl(train, rows)
    else:
        train = str(root / "renamed-*.jsonl")
        cuts = [0, *(len(rows) * (i + 1) // (shards + 1) for i in range(shards - 1)), len(rows)]
        for index, (start, end) in enumerate(zip(cuts, cuts[1:])):
            write_jsonl(root / f"renamed-{index:05d}.jsonl", rows[start:end])
    write_jsonl(root / "renamed_eval.jsonl", renamed(read_rows(job.eval)))
    return with_data(job, {"train": train, "eval": str(root / "renamed_eval.jsonl"), "streaming": True,
                           "shuffle_buffer": shuffle_buffer,
                           "columns": {"prompt": "question", "completion": "answer"}})
